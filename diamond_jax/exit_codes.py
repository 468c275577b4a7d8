"""Exit statuses of the entry points, shared with the launchers that read them (launch/)."""

EXIT_FAILED = 1  # a failure during the run (e.g. a non-finite loss)
EXIT_BAD_INPUT = 2  # a bad flag, config or workdir: the message says what to fix
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: the run saved and stopped; start it again to resume
EXIT_INTERRUPTED = 130  # a second Ctrl-C quit without saving (128 + SIGINT, as shells report it)
