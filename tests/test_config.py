import pytest

from svg2 import SVG2Config


def test_defaults_valid_and_roundtrip():
    cfg = SVG2Config()
    assert SVG2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(top_p=0.5).top_p == 0.5


@pytest.mark.parametrize(
    "field,value,exc",
    [
        ("top_p", 0.0, ValueError),
        ("top_p", 1.5, ValueError),
        ("min_kc_ratio", -0.1, ValueError),
        ("target_density", 0.0, ValueError),
        ("target_density", 2.0, ValueError),
        ("num_q_centroids", 0, ValueError),
        ("num_k_centroids", 2.5, TypeError),
        ("kmeans_iters_init", 0, ValueError),
        ("kmeans_iters_step", -1, ValueError),
        ("dense_steps_frac", 1.1, ValueError),
        ("dense_layers", -1, ValueError),
        ("attention_kernel", "", TypeError),
    ],
)
def test_invalid_field_is_named(field, value, exc):
    with pytest.raises(exc, match=field):
        SVG2Config(**{field: value})


def test_unknown_keys_are_listed():
    with pytest.raises(KeyError, match="known keys"):
        SVG2Config.from_dict({"top_k": 3})
    with pytest.raises(TypeError, match="unknown SVG2Config field"):
        SVG2Config().replace(topp=0.3)


def test_frozen():
    with pytest.raises(AttributeError):
        SVG2Config().top_p = 0.3  # type: ignore[misc]
