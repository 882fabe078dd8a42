"""One training process of a multi-process run, started by torchrun (or another launcher).

    python -m launcher.worker --launch runs/<name>/launch.json

launch.json (launcher.launch_file.Launch) is written by `r2gen-launch` after it validated the input
and made the plan. Every process
builds the model from it (same seed, same weights), joins the process group through
its backend and enters the one shared loop; rank 0 writes the run directory and prints the scores.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", type=Path, required=True, help="launch.json written by r2gen-launch")
    parser.add_argument("--deepspeed_config", type=Path, help="the deepspeed launcher's engine JSON "
                        "[default: launch.json's engine_config]")
    args = parser.parse_args(argv)

    from launcher.launch_file import Launch
    from r2gen.config import TrainConfig
    from r2gen.data.datasets import load_annotation
    from r2gen.data.tokenizer import Tokenizer
    from r2gen.errors import RunFailed
    from r2gen.build import prepare
    from r2gen.train import train

    launch = Launch.read(args.launch)
    engine = launch.spec
    backend = engine.build(launch.device, launch.precision, launch.engine)
    if engine.reads_config:  # the file its launcher passes (deepspeed: --deepspeed_config), else launch.json's
        path = args.deepspeed_config or Path(launch.engine_config)
        engine.configure(backend, engine.file.parse(path.read_text("utf-8")))  # type: ignore[union-attr]
    cfg = TrainConfig.from_dict(launch.config)
    # The launcher checked every image already; each process only parses the annotation.
    annotation = load_annotation(launch.annotation, launch.image_dir, cfg.model.dataset, check_images=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the launcher printed them once
        weights = Path(launch.visual_weights) if launch.visual_weights else None
        resume = Path(launch.resume) if launch.resume else None
        init_from = Path(launch.init_from) if launch.init_from else None  # a fine-tune's start
        vocabulary = Tokenizer.from_json(launch.tokenizer) if launch.tokenizer else None  # the launcher's
        prep = prepare(cfg, backend, annotation, weights, None if resume else init_from, vocabulary)  # resumed: its own
        prep.init_from, prep.weights_source = init_from, launch.weights_source  # the record
    try:
        result = train(prep, Path(launch.run_dir), plan_json=launch.plan, resume=resume)
    except RunFailed as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return exc.exit_code
    if backend.is_main:
        from launcher.console import print_result

        print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
