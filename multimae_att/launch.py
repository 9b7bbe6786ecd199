"""``python -m multimae_att.launch ARGS`` == ``accelerate launch ARGS`` with the torchvision guard.

The ``accelerate`` command-line tool imports timm when it is installed, which fails on CPU-only
torch with the registry's torchvision (see :mod:`multimae_att._torchvision_guard`). This entry
point installs the guard first and then hands over to Accelerate's own launcher, unchanged.

One addition: started as the leader of a session of its own (as the study's cells are,
:func:`multimae_att.study.cellrun.run_command`), a SIGTERM to this launcher is passed on to every
process of its group. Accelerate's single-process launcher just waits for its child, so without
this a stopped launcher would leave the runner training on; the multi-process launcher (torch's
elastic agent) installs its own handler, which stops its workers.
"""
import os
import signal
import sys

import multimae_att  # noqa: F401  (installs the torchvision guard)


def _terminate_group(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)   # this process ends with the signal too
    os.killpg(os.getpid(), signum)


def main() -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    if hasattr(os, "getsid") and os.getsid(0) == os.getpid():   # its own session: the group is this launch
        signal.signal(signal.SIGTERM, _terminate_group)
    parser = launch_command_parser()
    args = parser.parse_args(sys.argv[1:])
    launch_command(args)


if __name__ == "__main__":
    main()
