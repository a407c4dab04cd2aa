"""Request payload -> SamplingParams kwargs: defaults, validation, and a fuzz."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.engine.base import EngineInfo, StepOutput
from actors.errors import RequestError
from actors.handlers import build_sampling, step_item, token_ids_of

INFO = EngineInfo(model="m", total_kv_blocks=10, block_size=32, max_model_len=100, max_num_seqs=4,
                  max_num_batched_tokens=100, load_time_s=0.0, generation_defaults={"temperature": 0.7, "top_p": 0.9})


def test_starts_from_generation_defaults_and_request_wins() -> None:
    kw = build_sampling({"sampling_options": {"temperature": 0.0}}, INFO, prompt_len=10)
    assert kw["temperature"] == 0.0 and kw["top_p"] == 0.9
    assert kw["max_tokens"] == 90  # max_model_len - prompt


def test_max_tokens_default_is_at_least_one() -> None:
    assert build_sampling({}, INFO, prompt_len=100)["max_tokens"] == 1


def test_unknown_keys_are_ignored() -> None:
    kw = build_sampling({"sampling_options": {"bogus": 1}, "whatever": 2}, INFO, prompt_len=1)
    assert "bogus" not in kw


def test_sections_map_to_vllm_fields() -> None:
    kw = build_sampling({
        "sampling_options": {"n": 1, "seed": 3, "top_k": 5, "min_p": 0.1, "presence_penalty": 0.5,
                             "frequency_penalty": 0.2, "repetition_penalty": 1.1,
                             "guided_decoding": {"regex": "[a-z]+"}},
        "stop_conditions": {"max_tokens": 7, "stop": "END", "stop_token_ids_hidden": [2], "min_tokens": 1,
                            "ignore_eos": True},
        "output_options": {"logprobs": 3, "prompt_logprobs": 0, "skip_special_tokens": False},
    }, INFO, prompt_len=5)
    assert kw["structured_outputs"] == {"regex": "[a-z]+"}
    assert (kw["max_tokens"], kw["stop"], kw["stop_token_ids"], kw["min_tokens"]) == (7, ["END"], [2], 1)
    assert (kw["logprobs"], kw["prompt_logprobs"], kw["skip_special_tokens"]) == (3, 0, False)
    assert (kw["seed"], kw["top_k"], kw["ignore_eos"]) == (3, 5, True)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"output_options": {"logprobs": -1}}, "logprobs"),
        ({"output_options": {"logprobs": 1.5}}, "logprobs"),
        ({"output_options": {"logprobs": True}}, "logprobs"),
        ({"stop_conditions": {"max_tokens": 0}}, "max_tokens"),
        ({"stop_conditions": {"max_tokens": "5"}}, "max_tokens"),
        ({"sampling_options": {"temperature": float("inf")}}, "finite"),
        ({"sampling_options": {"use_beam_search": True}}, "beam"),
        ({"sampling_options": {"guided_decoding": {"json": {}, "regex": "x"}}}, "one of"),
        ({"sampling_options": "hot"}, "sampling_options must be an object"),
        ({"stop_conditions": {"stop": [1]}}, "stop"),
    ],
)
def test_bad_fields_are_named(payload: dict[str, Any], needle: str) -> None:
    with pytest.raises(RequestError) as info:
        build_sampling(payload, INFO, prompt_len=1)
    assert info.value.code == "invalid_request" and needle in info.value.message


@settings(max_examples=300)
@given(st.dictionaries(
    st.sampled_from(["sampling_options", "stop_conditions", "output_options", "token_ids", "x"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3),
              st.dictionaries(st.sampled_from(["max_tokens", "temperature", "logprobs", "stop", "seed", "n",
                                               "guided_decoding", "min_tokens", "ignore_eos"]),
                              st.one_of(st.none(), st.integers(-5, 5), st.floats(), st.text(max_size=3),
                                        st.booleans(), st.lists(st.integers(), max_size=2)), max_size=4)),
    max_size=4))
def test_any_payload_is_accepted_or_refused_with_a_request_error(payload: dict[str, Any]) -> None:
    try:
        tokens = token_ids_of(payload)
        build_sampling(payload, INFO, prompt_len=len(tokens))
    except RequestError as exc:
        assert exc.code == "invalid_request" and exc.message


def test_last_item_carries_usage() -> None:
    item = step_item(StepOutput(token_ids=[1], finish_reason="stop", prompt_tokens=3, completion_tokens=2,
                                cached_tokens=1, final=True))
    assert item["completion_usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                        "prompt_tokens_details": {"cached_tokens": 1}}
    assert "completion_usage" not in step_item(StepOutput(token_ids=[1]))


def test_a_sample_that_ends_before_the_request_says_which_without_usage() -> None:
    item = step_item(StepOutput(token_ids=[4], index=1, finish_reason="length"))
    assert (item["index"], item["finish_reason"]) == (1, "length") and "completion_usage" not in item
