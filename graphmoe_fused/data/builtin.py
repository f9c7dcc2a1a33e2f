"""The embedded task and tiny model, so that ``graphmoe-fused train`` runs with no download.

The "chain" task is a small world drawn from a seed: each person lives in a city, each city lies
in a country. Its questions are multiple choice (4 choices):

* 1-hop, person -> city: "Where does Ann live?";
* 1-hop, city -> country: "Which country is Rome in?";
* 2-hop, person -> country: "Which country does Ann live in?", whose answer chains the two.

Training holds every 1-hop fact and the 2-hop questions of some people; the eval split asks the
2-hop question of the other people ("chain-2hop": never trained on, only its two facts were)
and the two 1-hop facts each of them needs ("chain-1hop": trained facts, recalled).

Every question of a relation lists the same 4 choices in the same order (both drawn from the
seed), so a label stands for one entity: the 2-hop letter is a fixed function of the city's
letter, which held-out people can only get by chaining the facts, not by memorising their
prompt. (Measured with shuffled choices, the tiny frozen model memorised the training prompts
but stayed at chance on any new order: matching a recalled fact to its letter was beyond it.)

Why more rounds could help: the 2-hop answer needs two recalls in sequence. In GraphMoE's first
round the experts can recall the first fact (Ann -> Rome) into the token's state; the router of
the next round sees that state, so it can pick the experts that hold the second fact
(Rome -> Iran). With one round both recalls must happen in the same expert mix at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .prompts import render_multiple_choice
from .records import Example
from .vocab import BUILTIN_VOCAB_SIZE, CITIES, COUNTRIES, PEOPLE, SPECIAL_TOKENS

BUILTIN_TASKS = ("chain",)
NUM_CHOICES = 4
# People whose 2-hop question is held out for evaluation.
HELD_OUT_PEOPLE = 8
# Each "city -> country" fact is asked this many times in training, as there are far fewer
# cities than people and every 2-hop answer goes through one of them.
CITY_FACT_COPIES = 4

# LlamaConfig kwargs of the builtin tiny model (random init, seeded by load_base_model).
BUILTIN_MODEL = dict(
    vocab_size=BUILTIN_VOCAB_SIZE,
    hidden_size=96,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    bos_token_id=SPECIAL_TOKENS.index("<s>"),
    eos_token_id=SPECIAL_TOKENS.index("</s>"),
    tie_word_embeddings=False,
    # The base stays frozen and its final norm is all ones, so the logits' range is set by the
    # lm_head init: at LLaMA's 0.02 no logit can pass about 2 and the loss stalls near 4.8;
    # at 0.1 the LoRA experts can move the answer token to a confident logit.
    initializer_range=0.1,
)

# Training overrides that make the frozen random-init tiny model learn within about a minute
# on a CPU (applied only without --model, to fields the user did not set). Measured with 8
# experts, top-2, r=8, 3 rounds, AdamW, warm-up + linear decay, one CPU thread: after 40 epochs
# (200 steps, ~27 s) 85-98% of the 1-hop questions (train and eval, task seeds 0 and 1) are
# right, against 25% at the start; after 50 (250 steps, ~31 s) 100% on seed 0.
BUILTIN_PRESET = {"learning_rate": 3e-3, "epochs": 50, "batch_size": 16, "micro_batch_size": 16}

_CITY_QUESTION = "Where does {} live?"
_COUNTRY_QUESTION = "Which country is {} in?"
_CHAIN_QUESTION = "Which country does {} live in?"


@dataclass(frozen=True)
class BuiltinTask:
    """A builtin task: its training examples, its eval splits by name, and what it is."""

    name: str
    train: list[Example]
    eval: dict[str, list[Example]]
    description: str
    facts: dict[str, dict[str, str]] = field(default_factory=dict)


def _question(question: str, answer: str, choices: tuple[str, ...]) -> Example:
    prompt, labels = render_multiple_choice(question, choices)
    label = labels[choices.index(answer)]
    return Example(prompt=prompt, completion=" " + label, choices=labels, answer=label,
                   source="builtin:chain")


def chain_world(seed: int = 0) -> dict[str, dict[str, str]]:
    """The world of ``seed``: ``{"lives_in": {person: city}, "located_in": {city: country},
    "city_choices": ..., "country_choices": ...}`` (the last two map "0".."3" to the choices in
    their listed order). 4 cities and 4 countries are drawn, each city holds as many people,
    each country one city; the geography is fictional (drawn, not real)."""
    rng = random.Random(f"chain-world-{seed}")
    cities = tuple(rng.sample(CITIES, NUM_CHOICES))
    countries = tuple(rng.sample(COUNTRIES, NUM_CHOICES))
    homes = [cities[i % NUM_CHOICES] for i in range(len(PEOPLE))]
    rng.shuffle(homes)
    located = list(countries)
    rng.shuffle(located)
    return {"lives_in": dict(zip(PEOPLE, homes, strict=True)),
            "located_in": dict(zip(cities, located, strict=True)),
            "city_choices": {str(i): c for i, c in enumerate(cities)},
            "country_choices": {str(i): c for i, c in enumerate(countries)}}


def _chain_task(seed: int) -> BuiltinTask:
    world = chain_world(seed)
    lives_in, located_in = world["lives_in"], world["located_in"]
    cities = tuple(world["city_choices"].values())
    countries = tuple(world["country_choices"].values())
    rng = random.Random(f"chain-split-{seed}")
    held_out = sorted(rng.sample(PEOPLE, HELD_OUT_PEOPLE), key=PEOPLE.index)

    def lives(person: str) -> Example:
        return _question(_CITY_QUESTION.format(person), lives_in[person], cities)

    def located(city: str) -> Example:
        return _question(_COUNTRY_QUESTION.format(city), located_in[city], countries)

    def chain(person: str) -> Example:
        return _question(_CHAIN_QUESTION.format(person), located_in[lives_in[person]], countries)

    train = [lives(p) for p in PEOPLE]
    train += [located(c) for c in cities] * CITY_FACT_COPIES
    train += [chain(p) for p in PEOPLE if p not in held_out]
    one_hop = [lives(p) for p in held_out]
    one_hop += [located(c) for c in sorted({lives_in[p] for p in held_out}, key=cities.index)]
    description = (
        f"chain (seed {seed}): {len(PEOPLE)} people live in {NUM_CHOICES} cities of "
        f"{NUM_CHOICES} countries (fictional, drawn from the seed); {NUM_CHOICES}-way multiple "
        f"choice; train: every 1-hop fact and the 2-hop question of "
        f"{len(PEOPLE) - HELD_OUT_PEOPLE} people ({len(train)} examples); eval: chain-2hop, the "
        f"2-hop question of {HELD_OUT_PEOPLE} other people (never trained, only its two facts "
        f"were), and chain-1hop, those facts"
    )
    return BuiltinTask(name="chain", train=train,
                       eval={"chain-2hop": [chain(p) for p in held_out], "chain-1hop": one_hop},
                       description=description, facts=world)


def builtin_task(name: str = "chain", seed: int = 0) -> BuiltinTask:
    """The builtin task ``name`` drawn from ``seed`` (the same seed gives the same examples).

    Raises:
        ValueError: an unknown task name.
    """
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown builtin task {name!r}; choose from {', '.join(BUILTIN_TASKS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return _chain_task(seed)
