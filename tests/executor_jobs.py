"""Job functions for the executor tests; a module of its own so spawned workers can import them."""

import os


def square_plus(context, item):
    if item == "raise":
        raise RuntimeError("trial blew up")
    if item == "die":
        os._exit(3)  # the worker process vanishes mid-trial
    return context["offset"] + item * item, os.getpid(), id(context)
