"""LightningCLI entry point: train any LightningModule/DataModule pair from a YAML config.

    python examples/cli.py fit --config examples/configs/tiny_bigmac.yaml
    python examples/cli.py fit --config examples/configs/tiny_bigmac.yaml \
        --trainer.strategy.init_args.schedule=megatron

Importing ``lightning_bigmac`` registers the strategy; configs name it by class path
(``trainer.strategy.class_path: lightning_bigmac.BigMacStrategy``) so that ``init_args`` apply.
"""

from lightning.pytorch.cli import LightningCLI

import lightning_bigmac  # noqa: F401  (registers the "bigmac" strategies)


def main() -> None:
    LightningCLI(save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
