"""The faust worker, its topics and web views, and the `clv` command line."""
