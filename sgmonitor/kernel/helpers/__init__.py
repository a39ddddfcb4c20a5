"""Helpers named after the kernel code they mirror (``list.h`` → :mod:`.list`).

Every walk over guest data validates as it goes: a hostile guest gets a
:class:`~sgmonitor.errors.ValidationError`, never a hang.
"""
