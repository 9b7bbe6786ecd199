"""``python -m multimae_att.launch ARGS`` == ``accelerate launch ARGS`` with the torchvision guard.

The ``accelerate`` command-line tool imports timm when it is installed, which fails on CPU-only
torch with the registry's torchvision (see :mod:`multimae_att._torchvision_guard`). This entry
point installs the guard first and then hands over to Accelerate's own launcher, unchanged.
"""
import sys

import multimae_att  # noqa: F401  (installs the torchvision guard)


def main() -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(sys.argv[1:])
    launch_command(args)


if __name__ == "__main__":
    main()
