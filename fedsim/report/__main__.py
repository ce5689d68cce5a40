"""``python -m fedsim.report``: the same as the ``fedsim-report`` command."""

from fedsim.report import main

main()
