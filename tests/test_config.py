import json

import pytest

from llama2_jax.model import config as C
from llama2_jax.model.config import ConfigError, ModelConfig
from llama2_jax.model.transformer import abstract_model, param_count

# Published parameter counts of Llama 2 (Meta's model card / HF model sizes).
PUBLISHED = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}

# Meta's params.json files as released.
META_PARAMS = {
    "7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
           "vocab_size": -1},
    "13b": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
            "vocab_size": -1},
    "70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
            "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
}


@pytest.mark.parametrize("name", ["7b", "13b", "70b"])
def test_eval_shape_gives_published_parameter_counts(name):
    cfg = C.preset(name).with_dtype("bfloat16")
    model = abstract_model(cfg)  # ShapeDtypeStructs only: nothing is allocated
    assert param_count(model) == PUBLISHED[name] == cfg.num_params()


@pytest.mark.parametrize("name", ["7b", "13b", "70b"])
def test_meta_params_json_gives_presets(name, tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(META_PARAMS[name]))
    assert C.from_meta_params(path, vocab_size=32000) == C.preset(name)


def test_meta_vocab_minus_one_needs_tokenizer_size():
    with pytest.raises(ConfigError, match="vocab_size"):
        C.from_meta_params(META_PARAMS["7b"])


def test_hf_config_70b():
    hf = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
          "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
          "vocab_size": 32000, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
          "rope_theta": 10000.0}
    assert C.from_hf_config(hf) == C.LLAMA2_70B


def test_inconsistent_values_name_the_field():
    with pytest.raises(ConfigError, match="n_heads"):
        ModelConfig(dim=100, n_heads=3, n_kv_heads=3)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="config.json.*n_kv_heads"):
        C.from_hf_config({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                          "num_key_value_heads": 3, "intermediate_size": 8, "vocab_size": 10})
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig(dtype="int8")
    with pytest.raises(ConfigError, match="missing required key 'dim'"):
        C.from_meta_params({"n_layers": 2, "n_heads": 2}, vocab_size=10)
    with pytest.raises(ConfigError, match="unknown model preset"):
        C.preset("7B-chat")


def test_ffn_dim_matches_meta_rule():
    assert C.ffn_dim_from_meta(4096, 256, None) == 11008
    assert C.ffn_dim_from_meta(5120, 256, None) == 13824
    assert C.ffn_dim_from_meta(8192, 4096, 1.3) == 28672
