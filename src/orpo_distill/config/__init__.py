"""The run configuration: pydantic models of every section (``schema``), YAML and ``--set a.b=c``
overrides in (``loading``), one model per generator kind (``generators``), the config reference in docs/configuration.md (``reference``). See docs/architecture.md."""

from .loading import (
    DuplicateKeyError,
    apply_overrides,
    build_config,
    load_config,
    parse_override,
    read_yaml,
    resolved_dict,
    set_dotted,
    yaml_load,
)
from .reference import config_reference, update_readme
from .base import Strict
from .generators import (
    GeneratorConfig,
    HFGeneratorConfig,
    LocalModelConfig,
    OpenAIGeneratorConfig,
    ReplayGeneratorConfig,
    SamplingConfig,
    ScriptedGeneratorConfig,
    VLLMGeneratorConfig,
    generator_config,
)
from .schema import (
    DatasetConfig,
    EvalConfig,
    LoraConfig,
    PairsConfig,
    PhiRamp,
    RunConfig,
    SyntheticConfig,
    TaskConfig,
    TrainConfig,
    phi_policy,
    phi_text,
    upgrade_train_section,
)

__all__ = [
    "DatasetConfig", "DuplicateKeyError", "EvalConfig", "GeneratorConfig", "HFGeneratorConfig", "LocalModelConfig",
    "OpenAIGeneratorConfig", "ReplayGeneratorConfig", "ScriptedGeneratorConfig", "VLLMGeneratorConfig",
    "generator_config", "LoraConfig", "PairsConfig", "PhiRamp", "RunConfig",
    "SamplingConfig", "Strict", "SyntheticConfig", "TaskConfig", "TrainConfig", "apply_overrides", "build_config",
    "config_reference", "load_config", "parse_override", "phi_policy", "phi_text", "read_yaml", "resolved_dict", "set_dotted",
    "update_readme", "upgrade_train_section", "yaml_load",
]
