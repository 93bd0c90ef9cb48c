"""`python -m ahpa`: the `ahpa` command (torchrun starts `-m ahpa.cli`, the same entry point)."""

from ahpa.cli import run

if __name__ == "__main__":
    run()
