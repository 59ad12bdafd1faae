"""The settings of the exact-family comparison at matched accuracy (issue 14), in one place for
compare.py and the adapters that run the rows (ours.py, peers/pydvl_methods.py).

Both sides sweep their tolerance and each side's fastest run with rel. error ≤ ``BAR`` counts.
pyDVL's block CG stops a column when ‖r‖ < max(rtol²‖b‖, atol²), so its default rtol 1e-4 solves
to a residual of 1e-8, far below the bar; ``PYDVL_RTOLS`` land near it. ``OURS_TOLS`` are the
tolerances of our block CG (preconditioner="auto") besides its own 2e-4. pyDVL's rows are also
run with glibc keeping freed memory as influencekit's own calls do; their names end in
``RETAINED_HEAP``.
"""

BAR = 1e-4
OURS_TOLS = (5e-5, 1e-4, 5e-4)
PYDVL_RTOLS = (2e-2, 1e-2, 5e-3, 2e-3)
RETAINED_HEAP = "-retained-heap"
