# Test stand-in; the real cosyvoice/cli/__init__.py is empty as well.
