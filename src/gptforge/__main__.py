"""``python -m gptforge`` (and ``torchrun -m gptforge``) runs the CLI."""

from gptforge.cli import main

if __name__ == "__main__":
    main()
