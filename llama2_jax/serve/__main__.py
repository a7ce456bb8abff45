"""`python -m llama2_jax.serve --config configs/serve_demo.py`; see llama2_jax.serve.main."""

from typing import Sequence

from absl import app, logging

from llama2_jax import cli
from llama2_jax.serve.main import run


def main(argv: Sequence[str]) -> int:
    logging.set_verbosity(logging.WARNING)
    config = cli.flag_config(argv)
    if config is None:
        return 2
    return run(config)


if __name__ == "__main__":
    cli.define_config_flag("Server")
    app.run(main, flags_parser=cli.parse_flags)
