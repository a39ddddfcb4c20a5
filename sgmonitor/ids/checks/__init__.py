"""The checks, one module each (see ``sgmonitor.ids.registry``)."""
