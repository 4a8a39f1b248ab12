"""The runtime's numpy get_rope_index equals transformers' (5.24) for images of different grids and for text,
and the decode continuation (slot + delta on all three axes) is what transformers' generate feeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsedge.errors import PromptError
from rsedge.runtime.mrope import MropePositions, expand_image_tokens, merged_tokens, rope_index
from tests.qwen2_5_vl_helpers import reference, tiny_checkpoint

GRIDS = [(1, 4, 4), (1, 2, 8), (1, 10, 4), (1, 6, 6), (1, 32, 22)]  # square, wide, tall, small, large


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))


def _prompt(cfg, grids, rng) -> list[int]:
    """Text, then each image as vision_start, the pad repeated to its token count, vision_end."""
    ids = rng.integers(3, 600, size=7).tolist()
    for k in range(len(grids)):
        ids += [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
        ids += rng.integers(3, 600, size=3 + k).tolist()
    counts = [merged_tokens(g, cfg.spatial_merge_size) for g in grids]
    return expand_image_tokens(ids, counts, cfg.image_token_id)


@pytest.mark.parametrize("grids", [[g] for g in GRIDS] + [GRIDS[:3], []], ids=lambda g: "+".join(map(str, g)) or "text")
def test_rope_index_equals_transformers(ref, grids):
    cfg = ref.cfg
    ids = _prompt(cfg, grids, np.random.default_rng(len(grids)))
    got, delta = rope_index(ids, grids, cfg.image_token_id, cfg.spatial_merge_size)
    if not grids:  # transformers needs an image for get_rope_index; text positions are its arange
        np.testing.assert_array_equal(got, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))
        assert delta == 0
        return
    input_ids = torch.tensor([ids])
    types = (input_ids == cfg.image_token_id).int()
    want, want_delta = ref.model.model.get_rope_index(input_ids, types, torch.tensor(grids))
    np.testing.assert_array_equal(got, want[:, 0].numpy())
    assert delta == int(want_delta[0, 0]) and delta <= 0


def test_decode_positions_continue_as_transformers_generate(ref):
    cfg = ref.cfg
    grids = [GRIDS[1]]
    ids = _prompt(cfg, grids, np.random.default_rng(5))
    pos, delta = rope_index(ids, grids, cfg.image_token_id, cfg.spatial_merge_size)
    feeds = MropePositions(pos, delta)
    n = len(ids)
    np.testing.assert_array_equal(feeds(0, n)["rope_position_ids"][:, 0], pos)
    # chunks of a prefill and a step straddling the prompt's end
    np.testing.assert_array_equal(feeds(3, 4)["rope_position_ids"][:, 0], pos[:, 3:7])
    step = feeds(n - 1, 3)["rope_position_ids"][:, 0]
    np.testing.assert_array_equal(step[:, 0], pos[:, -1])
    np.testing.assert_array_equal(step[:, 1:], np.broadcast_to(np.arange(n, n + 2) + delta, (3, 2)))
    # transformers' compute_3d_position_ids for a decode step after a prefill of n tokens
    ref.model.model.rope_deltas = torch.tensor([[delta]])

    class Cache:
        def get_seq_length(self):
            return n

    want = ref.model.model.compute_3d_position_ids(
        input_ids=None, image_grid_thw=None, video_grid_thw=None, inputs_embeds=torch.zeros(1, 1, 4),
        attention_mask=None, cache=Cache(),
    )  # fmt: skip
    np.testing.assert_array_equal(feeds(n, 1)["rope_position_ids"], want.numpy())


def test_bad_prompts_are_one_line(ref):
    cfg = ref.cfg
    ids = _prompt(cfg, [GRIDS[0]], np.random.default_rng(0))
    with pytest.raises(PromptError, match="image 1 has 4 tokens in the prompt, its grid"):
        rope_index(ids, [(1, 4, 8)], cfg.image_token_id, 2)
    with pytest.raises(PromptError, match="1 image runs for 2 image grids"):
        rope_index(ids, [GRIDS[0], GRIDS[0]], cfg.image_token_id, 2)
