"""Structured outputs through `octavo serve` and the real OpenAI SDK: `parse()` with twenty
Pydantic models, greedy and sampled; json_object, choice and regex outputs; and the 400s for
constraints the engine cannot enforce. Requests go concurrently, so the engine batches them."""

from __future__ import annotations

import asyncio
import enum
import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from test_server import ServerProcess, request

MESSAGES = [{"role": "user", "content": "Make up an example record as JSON."}]
Name = Annotated[str, Field(max_length=16)]  # bounded, so a small model cannot ramble on


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: Name
    age: Annotated[int, Field(ge=0, le=120)]


class Point(BaseModel):
    x: Annotated[float, Field(ge=-10, le=10)]
    y: Annotated[float, Field(ge=-10, le=10)]


class Paint(BaseModel):
    color: Color
    litres: Annotated[int, Field(ge=1, le=20)]


class Tagged(BaseModel):
    title: Name
    tags: Annotated[list[Name], Field(max_length=3)]


class Address(BaseModel):
    street: Name
    city: Name


class Employee(BaseModel):
    person: Person
    address: Address


class Flag(BaseModel):
    enabled: bool


class MaybeNote(BaseModel):
    note: Name | None


class Status(BaseModel):
    state: Literal["open", "closed", "pending"]


class Scores(BaseModel):
    scores: Annotated[list[Annotated[int, Field(ge=0, le=100)]], Field(min_length=1, max_length=4)]


class Line(BaseModel):
    start: Point
    end: Point


class Product(BaseModel):
    sku: Name
    price: Annotated[float, Field(ge=0, le=1000)]
    in_stock: bool


class Team(BaseModel):
    name: Name
    members: Annotated[list[Person], Field(max_length=2)]


class Rating(BaseModel):
    stars: Annotated[int, Field(ge=1, le=5)]
    comment: Name | None


class Palette(BaseModel):
    colors: Annotated[list[Color], Field(max_length=3)]


class Temperature(BaseModel):
    celsius: Annotated[float, Field(ge=-50, le=60)]
    unit: Literal["C"]


class Book(BaseModel):
    title: Name
    year: Annotated[int, Field(ge=1450, le=2030)]
    author: Person


class Inventory(BaseModel):
    products: Annotated[list[Product], Field(max_length=2)]


class Coordinates(BaseModel):
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    label: Name | None


class Event(BaseModel):
    title: Name
    status: Status
    where: Coordinates


MODELS = [Person, Point, Paint, Tagged, Address, Employee, Flag, MaybeNote, Status, Scores, Line, Product, Team,
          Rating, Palette, Temperature, Book, Inventory, Coordinates, Event]
assert len(set(MODELS)) == 20


DEEP_SCHEMA: dict = {"type": "integer"}
for _ in range(500):
    DEEP_SCHEMA = {"type": "array", "items": DEEP_SCHEMA}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--max-model-len", "1024", "--max-num-seqs", "48", "--served-model-name", "default")
    yield proc
    assert proc.stop() == 0, proc.log_text()
    proc.remove_log()


def test_parse_returns_a_valid_object_of_every_model_greedy_and_sampled(server):
    async def parse(client: openai.AsyncOpenAI, model: type[BaseModel], temperature: float):
        completion = await client.chat.completions.parse(model="default", messages=MESSAGES, response_format=model,
                                                         temperature=temperature, seed=7, max_tokens=200)
        choice = completion.choices[0]
        return model, temperature, choice.finish_reason, choice.message.parsed, choice.message.content

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
        async with client:
            return await asyncio.gather(*(parse(client, m, t) for m in MODELS for t in (0.0, 1.0)))

    for model, temperature, finish_reason, parsed, content in asyncio.run(main()):
        assert finish_reason == "stop", (model.__name__, temperature, content)
        assert isinstance(parsed, model), (model.__name__, temperature, content)
        assert model.model_validate_json(content) == parsed


def test_json_object_choice_and_regex_outputs_always_conform(server):
    phone = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"
    choices = ["positive", "negative", "neutral"]

    async def chat(client, temperature: float, **extra):
        completion = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Is this good? Answer."}],
            temperature=temperature, seed=3, max_tokens=120, **extra)
        return completion.choices[0]

    async def complete(client, temperature: float, **extra):
        completion = await client.completions.create(model="default", prompt="My phone number is",
                                                     temperature=temperature, seed=5, max_tokens=30, **extra)
        return completion.choices[0]

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
        async with client:
            temperatures = (0.0, 1.0)
            objects = [chat(client, t, response_format={"type": "json_object"}) for t in temperatures]
            picks = [chat(client, t, extra_body={"structured_outputs": {"choice": choices}}) for t in temperatures]
            picks_v0 = [chat(client, t, extra_body={"guided_choice": choices}) for t in temperatures[:1]]
            phones = [complete(client, t, extra_body={"structured_outputs": {"regex": phone}}) for t in temperatures]
            return [await asyncio.gather(*group) for group in (objects, picks + picks_v0, phones)]

    objects, picks, phones = asyncio.run(main())
    for choice in objects:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in picks:
        assert choice.message.content in choices
    for choice in phones:
        assert re.fullmatch(phone, choice.text), choice.text


@pytest.mark.parametrize(("body", "param", "problem"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format", "strnig"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "dependentSchemas": {"a": {}}}}}},
     "response_format", "dependentSchemas"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs", "unclosed character class"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs", "missing"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_json": "{not json"}, "guided_json", "guided_json"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", "only one"),
    # Hostile sizes and types: each a 400, never a grammar that takes seconds to build.
    ({"structured_outputs": {"choice": ["x"] * 1025}}, "structured_outputs.choice", "<= 1024"),
    ({"guided_choice": [str(i) for i in range(100_000)]}, "guided_choice", "<= 1024"),
    ({"structured_outputs": {"choice": 7}}, "structured_outputs.choice", "array"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": DEEP_SCHEMA}}},
     "response_format", "recursion limit"),
])
def test_a_constraint_the_engine_cannot_enforce_is_a_400_naming_it(server, body, param, problem):
    for path, prompt in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "Hi"})):
        status, error = request(server, "POST", path, {"model": "default", "max_tokens": 5, **prompt, **body})
        assert status == 400, error
        assert error["error"]["param"] == param, error
        assert problem in error["error"]["message"], error
    # The server still serves.
    status, _ = request(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200


def test_n_choices_each_follow_the_schema_and_metrics_count_the_grammars(server):
    """n > 1: the frontend fans out child requests, each sampling under its own matcher of one
    grammar; /metrics counts the grammars built and those taken from the cache."""
    def counter(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f"octavo:{name}_total{{"))

    def scrape() -> str:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
            return response.read().decode()

    before = scrape()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
    completion = client.chat.completions.parse(model="default", messages=MESSAGES, response_format=Rating, n=3,
                                               temperature=1.0, seed=11, max_tokens=120)
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Rating), choice.message.content
    after = scrape()
    lookups = sum(counter(after, f"structured_output_cache_{kind}") - counter(before, f"structured_output_cache_{kind}")
                  for kind in ("hits", "misses"))
    assert lookups == 3  # one per child request
