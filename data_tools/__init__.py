"""Command-line tools: `python -m data_tools.preprocess` and `python -m data_tools.convert`."""
EXIT_INTERRUPTED = 130
_state = {"published": False}


def start_run() -> None:
    """A tool's run begins: nothing is in place yet."""
    _state["published"] = False


def mark_published() -> None:
    """The outputs are in place: an interrupt from now on only stops the cleanup after it."""
    _state["published"] = True


def interrupted_line(stop: BaseException) -> str:
    """The one line a tool prints when Ctrl-C ended it (its cleanup has run: `finally`)."""
    why = str(stop) or "SIGINT"
    if _state["published"]:
        return (f"error: interrupted ({why}) after the outputs were in place (they are "
                f"complete); a hidden staging or .old-* directory beside them may be left")
    return (f"error: interrupted ({why}); its staging files are removed, and earlier outputs "
            f"are kept")
