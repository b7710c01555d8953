"""``python -m lightning_memopt fit --config recipe.yaml``: the same as the ``lightning-memopt`` command."""

from lightning_memopt.cli import main

if __name__ == "__main__":
    main()
