"""``jds.models.generate``: greedy equals step-by-step argmax; sampling is seeded."""

import jax.numpy as jnp
import numpy as np
import pytest

import jds
from jds.models import generate

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=24)


@pytest.fixture(scope="module")
def model():
    return jds.models.build("llama-tiny", seed=3, **SMALL)


def test_greedy_equals_argmax_of_full_forward(model):
    prompt = [5, 17, 99]
    got = generate(model, prompt, 6, temperature=0)
    ids = list(prompt)
    for _ in range(6):  # reference: re-run the whole sequence each step, no buffer tricks
        logits = model(jnp.asarray([ids], jnp.int32))
        ids.append(int(np.argmax(np.asarray(logits[0, -1]))))
    assert got == ids[len(prompt):]


def test_sampling_is_seeded_and_respects_top_k(model):
    a = generate(model, [1, 2], 10, temperature=1.0, top_k=3, seed=7)
    b = generate(model, [1, 2], 10, temperature=1.0, top_k=3, seed=7)
    c = generate(model, [1, 2], 10, temperature=1.0, seed=8)
    assert a == b and len(a) == 10 and a != c
    # top_k=1 is greedy whatever the temperature
    assert generate(model, [1, 2], 5, temperature=2.0, top_k=1, seed=0) == \
        generate(model, [1, 2], 5, temperature=0)


def test_length_capped_by_positions_and_errors(model):
    assert len(generate(model, list(range(20)), 50, temperature=0)) == 4
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [256], 3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1], 3, top_k=0)
    with pytest.raises(ValueError, match="no room"):
        generate(model, list(range(24)), 3)
