"""launch.json: what every training process of a run needs, written once by `r2gen-launch` after it
validated the input and made the plan (launcher.run.launch_processes), read by each process
(launcher.worker). Typed here, so writer and reader cannot drift apart: the resolved configuration,
engine, device, precision, engine options and config file, data paths, vocabulary, the checkpoint
a fine-tune starts from or a run continues from, and the plan.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from backends.spec import EngineSpec
from r2gen.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    backend: str
    device: str
    precision: str
    engine: dict  # the engine's options (the plan's)
    engine_config: str | None  # the engine's config file, where it reads one
    config: dict  # TrainConfig.to_dict()
    annotation: str
    image_dir: str
    run_dir: str
    tokenizer: str | None  # Tokenizer.to_json(): the launcher's vocabulary
    plan: str  # Plan.to_json()
    weights_source: str
    visual_weights: str | None = None
    init_from: str | None = None  # a fine-tune's start
    resume: str | None = None  # the state a continued run starts from

    @property
    def spec(self) -> EngineSpec:
        """The run's engine (the registry's, by the name launch.json stores)."""
        from backends.registry import spec

        return spec(self.backend)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, source: Path | str = "launch.json") -> Launch:
        """The launch a dict describes; a missing or unknown field is a ConfigError naming the file."""
        if not isinstance(data, dict):
            raise ConfigError(f"--launch: {source} holds no launch object")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - data.keys()):
            raise ConfigError(f"--launch: {source} lacks {', '.join(missing)}")
        if unknown := sorted(data.keys() - names):
            raise ConfigError(f"--launch: {source} has unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def write(self, path: Path) -> None:
        from r2gen.atomic import write_json

        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> Launch:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")), path)
