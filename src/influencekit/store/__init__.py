"""On-disk formats: a saved fit (``fitted``); all written through :mod:`influencekit.io`."""
