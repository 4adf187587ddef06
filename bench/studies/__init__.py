"""One-off studies: each answered a design question once; runnable through `python -m bench`, not maintained figures."""
