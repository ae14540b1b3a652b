"""Ollama model names: today's rules, with seed 003's examples where they still hold."""

from __future__ import annotations

import pytest

from tasks.errors import KilnError
from tasks.ollama_name import (
    InvalidModelName,
    ModelName,
    default_ollama_name,
    is_valid_model_name,
    parse_model_name,
)

# Seed 003 (v0.1.33) examples that today's grammar still accepts, minus
# their `+build` / `@digest` suffixes, which no longer exist.
SEED_VALID_TODAY = [
    "example.com/bruce/mistral:latest",
    "example.com/library/mistral:7b",
    "example.com/eva/mistral:7b",
    "mistral:7b",
    "registry.ollama.ai/library/mistral:latest",
    "example.com/jmorganca/mistral:latest",
]
# Seed 003's invalid examples: still invalid.
SEED_INVALID = ["example.com/mistral:7b+", "example.com/mistral:7b+Q4_0+", "x/y/z/z:8n+I", ""]
# Valid in seed 003 (v0.1.33), refused by today's servers.
SEED_VALID_THEN_REFUSED_NOW = [
    "example.com/library/mistral:7b+x",
    "example.com/eva/mistral:7b+Q4_0",
    "mistral:7b+x",
    "example.com/mike/mistral:latest+Q4_0",
    "example.com/pdevine/thisisfine:7b+Q4_0@sha256-1234567890abcdef",
]


@pytest.mark.parametrize("name", SEED_VALID_TODAY)
def test_seed_examples_that_still_hold_are_accepted(name: str) -> None:
    assert is_valid_model_name(name)


@pytest.mark.parametrize("name", SEED_INVALID + SEED_VALID_THEN_REFUSED_NOW)
def test_seed_examples_refused_today(name: str) -> None:
    with pytest.raises(InvalidModelName):
        parse_model_name(name)


def test_refusal_is_a_kiln_error_naming_the_part_and_rule() -> None:
    with pytest.raises(KilnError) as info:
        parse_model_name("mistral:7b+x")
    message = str(info.value)
    assert "tag" in message and "'+'" in message and "letters, digits" in message


def test_defaults_fill_host_namespace_and_tag() -> None:
    assert parse_model_name("mistral") == ModelName("registry.ollama.ai", "library", "mistral", "latest")
    assert parse_model_name("jmorganca/mistral") == ModelName("registry.ollama.ai", "jmorganca", "mistral", "latest")
    assert parse_model_name("example.com/ns/m:q4_k_m") == ModelName("example.com", "ns", "m", "q4_k_m")


def test_host_may_carry_a_port_and_a_scheme() -> None:
    parsed = parse_model_name("localhost:5000/team/model:v1.2")
    assert (parsed.host, parsed.namespace, parsed.model, parsed.tag) == ("localhost:5000", "team", "model", "v1.2")
    assert parse_model_name("https://example.com/team/model").host == "example.com"
    with pytest.raises(InvalidModelName, match="scheme"):
        parse_model_name("ftp://example.com/team/model")


@pytest.mark.parametrize(
    ("name", "part", "rule"),
    [
        ("-model", "model", "must start"),
        (".hidden", "model", "must start"),
        ("my.ns/model", "namespace", "contains '.'"),
        ("a:b:c", "model", "contains ':'"),
        ("model:-tag", "tag", "must start"),
        ("model:", "tag", "empty"),
        ("ns/", "model", "empty"),
        ("/model", "namespace", "empty"),
        ("host//model", "namespace", "empty"),
        ("mod el", "model", "contains ' '"),
        ("modèle", "model", "contains 'è'"),
    ],
)
def test_invalid_parts_are_named(name: str, part: str, rule: str) -> None:
    with pytest.raises(InvalidModelName) as info:
        parse_model_name(name)
    assert f"the {part}" in str(info.value)
    assert rule in str(info.value)


def test_underscore_may_start_a_part_today() -> None:
    assert is_valid_model_name("_ns/_model:_tag")


def test_part_lengths_follow_todays_limits_not_seed_003s() -> None:
    assert is_valid_model_name("m" * 80)
    with pytest.raises(InvalidModelName, match="1 to 80"):
        parse_model_name("m" * 81)
    # Seed 003 allowed 128-character parts; today's servers refuse them.
    with pytest.raises(InvalidModelName, match="model"):
        parse_model_name("m" * 128)
    assert is_valid_model_name("model:" + "t" * 80)
    assert not is_valid_model_name("model:" + "t" * 81)
    assert not is_valid_model_name("n" * 81 + "/model")
    host = "h" * 350
    assert is_valid_model_name(f"{host}/ns/model")
    with pytest.raises(InvalidModelName, match="1 to 350"):
        parse_model_name(f"{host}h/ns/model")


@pytest.mark.parametrize(
    ("name", "shortest"),
    [
        ("registry.ollama.ai/library/mistral:latest", "mistral"),
        ("example.com/jmorganca/mistral:latest", "example.com/jmorganca/mistral"),
        ("registry.ollama.ai/jmorganca/mistral:7b", "jmorganca/mistral:7b"),
        ("example.com/library/mistral", "example.com/library/mistral"),
        ("REGISTRY.ollama.ai/Library/Mistral:LATEST", "Mistral"),
    ],
)
def test_display_shortest_drops_default_parts(name: str, shortest: str) -> None:
    assert parse_model_name(name).display_shortest() == shortest


def test_names_compare_without_case() -> None:
    # Seed 003's MapHash example, without the build suffixes that no longer exist.
    a, b, c = (parse_model_name(n) for n in ("mistral:latest", "miSTRal:latest", "mistral:LATest"))
    assert a.equal_fold(b) and b.equal_fold(c)
    assert not a.equal_fold(parse_model_name("mistral:7b"))


@pytest.mark.parametrize(
    ("base", "quant", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_K_M", "smollm2-135m-instruct:q4_k_m"),
        ("SmolLM2-135M-Instruct", "f16", "smollm2-135m-instruct:f16"),
        ("org/My Model (v2)!", "Q8_0", "my-model-v2:q8_0"),
        ("org/.hidden--name.", "BF16", "hidden-name:bf16"),
        ("meta-llama/Llama-3.1-8B-Instruct", "Q4_K_M", "llama-3.1-8b-instruct:q4_k_m"),
    ],
)
def test_default_name_is_lower_case_and_sanitized(base: str, quant: str, expected: str) -> None:
    assert default_ollama_name(base, quant) == expected
    assert is_valid_model_name(expected)


def test_default_name_is_truncated_to_a_valid_length() -> None:
    name = default_ollama_name("org/" + "x" * 200, "Q4_K_M")
    model, tag = name.split(":")
    assert len(model) == 80 and tag == "q4_k_m"
    assert is_valid_model_name(name)


@pytest.mark.parametrize(("base", "quant"), [("org/!!!", "Q4_K_M"), ("model", "+++")])
def test_default_name_refuses_when_nothing_usable_is_left(base: str, quant: str) -> None:
    with pytest.raises(InvalidModelName, match="nothing usable"):
        default_ollama_name(base, quant)
