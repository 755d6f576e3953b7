"""Deterministic synthetic task generators for fine-tuning experiments.

Four tasks exercise the three ways lorakit fine-tunes a model:

* :func:`generate_one_more` - one-sentence word problems where someone gains or loses one thing
  (``"Ada has 4 shells and finds one more. How many shells does Ada have now?"`` -> ``" 5"``), the task of
  ``make demo``: small enough for the bundled 5M-parameter model to learn in a minute on CPU.  Its eval
  file uses names that never occur in its training file.
* :func:`generate_arithmetic` - short multi-step arithmetic word problems
  (GSM8K-like, 2-3 operations, small numbers) as prompt/completion pairs whose
  completion shows the steps and ends with ``"The answer is N."``; score with
  :func:`extract_answer` and exact match.
* :func:`generate_domain_shift` - templated cooking recipes, a domain the bundled
  base model (trained on Python documentation) has never seen; rows ``{"text"}``
  for continued pretraining and forgetting measurements.
* :func:`generate_sentiment` - short product/service reviews labelled
  ``1`` (positive) or ``0`` (negative) for sequence classification.

Every generator is a pure function of ``(n, seed)``: it uses its own
:class:`random.Random` and never the global random state, so the same call
returns the same rows on every machine and Python 3.11+ version.

Command line::

    lorakit tasks arithmetic --n 2000 --seed 0 --out arithmetic.jsonl
    lorakit tasks bundle            # rewrites src/lorakit/bundled/data
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lorakit.util.files import iter_jsonl, write_text
from lorakit.util.resources import BUNDLED_DIR

__all__ = [
    "BUNDLED_FILES",
    "HELDOUT_GENERATORS",
    "ONE_MORE_HELDOUT_NAMES",
    "ONE_MORE_TRAIN_NAMES",
    "TASKS",
    "extract_answer",
    "generate_arithmetic",
    "generate_domain_shift",
    "generate_one_more",
    "generate_sentiment",
    "read_jsonl",
    "write_bundled_data",
    "write_jsonl",
]

Row = dict[str, Any]

# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #
_NAMES = (
    "Ada", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jon", "Kim", "Leo", "Mia", "Nia",
    "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wen", "Yara", "Zoe",
)


def write_jsonl(rows: Iterable[Row], path: str | Path) -> Path:
    """Write ``rows`` as JSON Lines (one UTF-8 JSON object per line).

    Written atomically; parent folders are created.  Keys keep their insertion order so output is
    byte-for-byte reproducible.

    Args:
        rows: Dictionaries to write.
        path: Destination file.

    Returns:
        The destination path.
    """
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[Row]:
    """Read a JSON Lines file written by :func:`write_jsonl` (blank lines skipped)."""
    return [row for _, row in iter_jsonl(path)]


def _check_n(n: int) -> None:
    """Reject a negative row count."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


# --------------------------------------------------------------------------- #
# Arithmetic word problems
# --------------------------------------------------------------------------- #
_ITEMS = (
    ("apple", "apples"), ("marble", "marbles"), ("pencil", "pencils"), ("sticker", "stickers"),
    ("cookie", "cookies"), ("book", "books"), ("shell", "shells"), ("card", "cards"),
    ("balloon", "balloons"), ("stamp", "stamps"), ("egg", "eggs"), ("flower", "flowers"),
)
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("pack", "packs"))
_GOODS = (("pen", "pens"), ("notebook", "notebooks"), ("cup", "cups"), ("toy car", "toy cars"),
          ("sandwich", "sandwiches"), ("ticket", "tickets"), ("ball", "balls"))

_ANSWER_RE = re.compile(r"answer is\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalise_number(token: str) -> str:
    """Canonical string of a number: no thousands commas, no trailing ``.0``."""
    token = token.replace(",", "")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    if token in {"-0", ""}:
        token = "0"
    return token


def extract_answer(text: str, strict: bool = False) -> str | None:
    """Extract the final numeric answer from a model completion.

    The last ``"The answer is N"`` wins.  Without such a phrase the last number
    in the text is used unless ``strict`` is true.  Numbers are normalised
    (``"1,200"`` -> ``"1200"``, ``"7.0"`` -> ``"7"``) so that the result can be
    compared with a row's ``"answer"`` by string equality.

    Args:
        text: Generated text (the completion, or prompt + completion).
        strict: Only accept the ``"The answer is N"`` form.

    Returns:
        The normalised answer, or ``None`` if none is found.
    """
    matches = _ANSWER_RE.findall(text)
    if matches:
        return _normalise_number(matches[-1])
    if strict:
        return None
    numbers = _NUMBER_RE.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


def _pick_name(rng: random.Random) -> str:
    """A random first name."""
    return rng.choice(_NAMES)


def _dollars(amount: int) -> str:
    """``"1 dollar"`` / ``"N dollars"``."""
    return f"{amount} dollar" if amount == 1 else f"{amount} dollars"


def _arith_add_sub(rng: random.Random) -> tuple[str, list[str], int]:
    """Start with some items, gain some, lose some (2 steps)."""
    name = _pick_name(rng)
    item = rng.choice(_ITEMS)[1]
    a, b = rng.randint(3, 20), rng.randint(2, 15)
    c = rng.randint(1, a + b - 1)
    gain = rng.choice(("finds", "buys", "is given", "picks up"))
    lose = rng.choice(("gives away", "loses", "uses", "sells"))
    prompt = (f"{name} has {a} {item}. {name} {gain} {b} more and then {lose} {c}. "
              f"How many {item} does {name} have now?")
    steps = [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."]
    return prompt, steps, a + b - c


def _arith_groups_plus(rng: random.Random) -> tuple[str, list[str], int]:
    """Several full containers plus loose items (2 steps)."""
    name = _pick_name(rng)
    item = rng.choice(_ITEMS)[1]
    container, containers = rng.choice(_CONTAINERS)
    per, k, loose = rng.randint(2, 10), rng.randint(2, 6), rng.randint(1, 9)
    prompt = (f"Each {container} holds {per} {item}. {name} has {k} {containers} "
              f"and {loose} loose {item}. How many {item} does {name} have in total?")
    steps = [f"{k} * {per} = {k * per}.", f"{k * per} + {loose} = {k * per + loose}."]
    return prompt, steps, k * per + loose


def _arith_shopping(rng: random.Random) -> tuple[str, list[str], int]:
    """Buy two kinds of goods at unit prices (3 steps)."""
    name = _pick_name(rng)
    (g1, g1s), (g2, g2s) = rng.sample(_GOODS, 2)
    p1, p2 = rng.randint(1, 9), rng.randint(1, 9)
    q1, q2 = rng.randint(2, 5), rng.randint(1, 4)
    prompt = (f"A {g1} costs {_dollars(p1)} and a {g2} costs {_dollars(p2)}. {name} buys {q1} {g1s} "
              f"and {q2} {g2s if q2 > 1 else g2}. How many dollars does {name} spend?")
    steps = [f"{q1} * {p1} = {q1 * p1}.", f"{q2} * {p2} = {q2 * p2}.",
             f"{q1 * p1} + {q2 * p2} = {q1 * p1 + q2 * p2}."]
    return prompt, steps, q1 * p1 + q2 * p2


def _arith_share(rng: random.Random) -> tuple[str, list[str], int]:
    """Share items equally, then some are eaten or lost (2 steps)."""
    name = _pick_name(rng)
    item = rng.choice(_ITEMS)[1]
    friends, each = rng.randint(2, 6), rng.randint(2, 9)
    total = friends * each
    eaten = rng.randint(1, each - 1)
    prompt = (f"{name} shares {total} {item} equally among {friends} friends. "
              f"One friend then gives {eaten} of them away. How many {item} does that friend have left?")
    steps = [f"{total} / {friends} = {each}.", f"{each} - {eaten} = {each - eaten}."]
    return prompt, steps, each - eaten


def _arith_change(rng: random.Random) -> tuple[str, list[str], int]:
    """Pay with a bill for several items and get change (2 steps)."""
    name = _pick_name(rng)
    good, goods = rng.choice(_GOODS)
    price, qty = rng.randint(1, 9), rng.randint(2, 5)
    cost = price * qty
    bill = next(b for b in (10, 20, 50, 100) if b >= cost)
    prompt = (f"{name} buys {qty} {goods} that cost {_dollars(price)} each and pays with a {bill} dollar bill. "
              f"How many dollars of change does {name} get?")
    steps = [f"{qty} * {price} = {cost}.", f"{bill} - {cost} = {bill - cost}."]
    return prompt, steps, bill - cost


def _arith_three_step(rng: random.Random) -> tuple[str, list[str], int]:
    """Add, double or triple, then subtract (3 steps)."""
    name = _pick_name(rng)
    item = rng.choice(_ITEMS)[1]
    a, b = rng.randint(2, 12), rng.randint(1, 8)
    factor, word = rng.choice(((2, "doubles"), (3, "triples")))
    mid = (a + b) * factor
    c = rng.randint(1, mid - 1)
    prompt = (f"{name} has {a} {item} and gets {b} more. Then {name} {word} the number of {item} "
              f"and gives {c} to a friend. How many {item} does {name} have now?")
    steps = [f"{a} + {b} = {a + b}.", f"{a + b} * {factor} = {mid}.", f"{mid} - {c} = {mid - c}."]
    return prompt, steps, mid - c


_ARITH_TEMPLATES: tuple[Callable[[random.Random], tuple[str, list[str], int]], ...] = (
    _arith_add_sub, _arith_groups_plus, _arith_shopping, _arith_share, _arith_change, _arith_three_step,
)


def generate_arithmetic(n: int, seed: int) -> list[Row]:
    """Generate ``n`` arithmetic word problems.

    Args:
        n: Number of rows.
        seed: Seed; the same ``(n, seed)`` always gives the same rows, and the
            first ``k`` rows of a larger ``n`` equal the rows for ``n=k``.

    Returns:
        Rows ``{"prompt", "completion", "answer"}``.  The prompt ends with
        ``"\\nAnswer:"``; the completion starts with a space, shows each step and
        ends with ``"The answer is N."``; ``answer`` is ``str(N)``.
    """
    _check_n(n)
    rng = random.Random(f"arithmetic:{seed}")
    rows: list[Row] = []
    for _ in range(n):
        template = rng.choice(_ARITH_TEMPLATES)
        question, steps, answer = template(rng)
        rows.append({
            "prompt": f"Question: {question}\nAnswer:",
            "completion": " " + " ".join(steps) + f" The answer is {answer}.",
            "answer": str(answer),
        })
    return rows


# --------------------------------------------------------------------------- #
# One more / one fewer (the demo's task)
# --------------------------------------------------------------------------- #
#: Names kept out of the ``one_more`` training rows; the bundled eval file uses only these.
ONE_MORE_HELDOUT_NAMES = ("Ivo", "Nia", "Rosa", "Vic", "Zoe")
#: Names of the ``one_more`` training rows.
ONE_MORE_TRAIN_NAMES = tuple(n for n in _NAMES if n not in ONE_MORE_HELDOUT_NAMES)
_GAIN_ONE = ("finds one more", "buys one more", "is given one more", "picks up one more")
_LOSE_ONE = ("loses one", "gives one away", "uses one", "sells one")


def generate_one_more(n: int, seed: int, names: tuple[str, ...] = ONE_MORE_TRAIN_NAMES) -> list[Row]:
    """Generate ``n`` one-step word problems: someone has 1-9 things and gains or loses one.

    ``"Question: Ada has 4 shells and finds one more. How many shells does Ada have now?\\nAnswer:"`` ->
    ``" 5"``.  Half gain one (4 phrasings), half lose one (4 phrasings); 12 kinds of object.  To answer, a
    model must find the number in the sentence and tell a gain from a loss.

    Args:
        n: Number of rows.
        seed: Seed; the same ``(n, seed, names)`` always gives the same rows, and the first ``k`` rows of a
            larger ``n`` equal the rows for ``n=k``.
        names: Whose things they are (default: every name but :data:`ONE_MORE_HELDOUT_NAMES`).

    Returns:
        Rows ``{"prompt", "completion", "answer"}``: the prompt ends with ``"\\nAnswer:"``, the completion is
        ``" N"`` and ``answer`` is ``str(N)`` (0-10).
    """
    _check_n(n)
    if not names:
        raise ValueError("names must not be empty")
    rng = random.Random(f"one_more:{seed}")
    rows: list[Row] = []
    for _ in range(n):
        name = rng.choice(names)
        item, items = rng.choice(_ITEMS)
        count = rng.randint(1, 9)
        gain = rng.random() < 0.5
        verb = rng.choice(_GAIN_ONE if gain else _LOSE_ONE)
        answer = count + 1 if gain else count - 1
        question = (f"{name} has {count} {item if count == 1 else items} and {verb}. "
                    f"How many {items} does {name} have now?")
        rows.append({"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}", "answer": str(answer)})
    return rows


def _generate_one_more_heldout(n: int, seed: int) -> list[Row]:
    """``one_more`` rows with the held-out names only (the bundled eval file)."""
    return generate_one_more(n, seed, names=ONE_MORE_HELDOUT_NAMES)


# --------------------------------------------------------------------------- #
# Domain shift: cooking recipes
# --------------------------------------------------------------------------- #
_DISH_BASES = ("soup", "stew", "salad", "curry", "risotto", "pie", "tart", "bake", "stir-fry", "porridge", "pancakes",
               "flatbread", "casserole", "noodles", "omelette", "chowder")
#: ``(word used in the title, ingredient as written in the list and method)``
_MAIN_INGREDIENTS = (
    ("carrot", "carrots"), ("lentil", "red lentils"), ("pumpkin", "pumpkin"), ("mushroom", "mushrooms"),
    ("spinach", "spinach"), ("chickpea", "chickpeas"), ("tomato", "tomatoes"), ("leek", "leeks"),
    ("potato", "potatoes"), ("cabbage", "cabbage"), ("apple", "apples"), ("pear", "pears"),
    ("sweetcorn", "sweetcorn"), ("courgette", "courgettes"), ("beetroot", "beetroot"), ("onion", "onions"),
    ("pea", "peas"), ("parsnip", "parsnips"), ("celery", "celery"), ("pepper", "peppers"),
)
_STYLES = ("Grandma's", "Rustic", "Quick", "Hearty", "Spiced", "Smoky", "Golden", "Harvest", "Sunday", "Farmhouse",
           "Herby", "Creamy", "Simple", "Midweek")
_FATS = ("olive oil", "butter", "sunflower oil", "rapeseed oil")
_LIQUIDS = ("vegetable stock", "milk", "cream", "water", "coconut milk", "apple juice")
_FLAVOURS = ("garlic", "ginger", "paprika", "cumin", "thyme", "nutmeg", "cinnamon", "chilli flakes", "oregano",
             "smoked salt", "mustard seeds", "turmeric")
_FINISHES = ("parsley", "chives", "lemon zest", "grated cheddar", "toasted seeds", "yoghurt", "black pepper", "basil")
_OPTIONAL_STEPS = (
    "Add the {f} and cook for 1 minute until fragrant.",
    "Stir well, cover and cook for {t} minutes, stirring now and then.",
    "Blend half of the mixture until smooth, then return it to the pan.",
    "Simmer uncovered for {t2} minutes until thick.",
    "Transfer to a baking dish and bake at {o} degrees for {t2} minutes until golden.",
    "Taste and season with salt if needed.",
)
_TIPS = (
    "Tip: this keeps in the fridge for {d} days.",
    "Tip: swap the {f} for {f2} if you prefer a different flavour.",
    "Tip: it freezes well for up to {d} weeks.",
    "Tip: serve with warm bread and a green salad.",
    "Tip: make a double batch and save half for later.",
)


def _recipe(rng: random.Random) -> str:
    """One templated recipe: title, metadata, ingredients, ordered method and a tip."""
    title_word, main = rng.choice(_MAIN_INGREDIENTS)
    title = f"{rng.choice(_STYLES)} {title_word.capitalize()} {rng.choice(_DISH_BASES).capitalize()}"
    fat, liquid, finish = rng.choice(_FATS), rng.choice(_LIQUIDS), rng.choice(_FINISHES)
    flavour, flavour2 = rng.sample(_FLAVOURS, 2)
    fill = {
        "m": main, "a": fat, "c": liquid, "f": flavour, "f2": flavour2, "s": finish,
        "t": rng.choice((5, 8, 10, 12, 15)), "t2": rng.choice((10, 15, 20, 25, 30)),
        "o": rng.choice((160, 180, 190, 200, 220)), "d": rng.choice((2, 3, 4, 5)),
    }
    prep, cook = rng.choice((5, 10, 15, 20)), rng.choice((15, 20, 25, 30, 40, 45, 60))
    lines = [
        f"Recipe: {title}",
        f"Serves: {rng.randint(2, 8)} | Prep: {prep} min | Cook: {cook} min",
        "Ingredients:",
        f"- {rng.choice((200, 300, 400, 500, 600))} g {main}",
        f"- {rng.randint(1, 3)} tbsp {fat}",
        f"- {rng.choice((1, 2))} tsp {flavour}",
        f"- {rng.choice((150, 200, 250, 300, 500))} ml {liquid}",
        f"- a handful of {finish}",
        "Method:",
    ]
    chosen = sorted(rng.sample(range(len(_OPTIONAL_STEPS)), rng.randint(2, 4)))
    method = [
        "Heat the {a} in a large pan over a medium heat.",
        rng.choice(("Finely chop the {m} and add it to the pan.", "Slice the {m} and fry it for {t} minutes.")),
        *[_OPTIONAL_STEPS[i] for i in chosen],
        "Pour in the {c}, bring to a gentle simmer and cook for {t} minutes.",
        "Serve topped with the {s}.",
    ]
    # Keep the liquid step before blending/simmering/baking steps when present.
    liquid_step = method.pop(-2)
    method.insert(2 + sum(1 for i in chosen if i < 2), liquid_step)
    for number, step in enumerate(method, start=1):
        lines.append(f"{number}. {step.format(**fill)}")
    lines.append(rng.choice(_TIPS).format(**fill))
    return "\n".join(lines)


def generate_domain_shift(n: int, seed: int) -> list[Row]:
    """Generate ``n`` templated cooking recipes (a new domain for the base model).

    Args:
        n: Number of rows.
        seed: Seed; same ``(n, seed)`` gives the same rows.

    Returns:
        Rows ``{"text": recipe}`` of roughly 400-700 characters each.
    """
    _check_n(n)
    rng = random.Random(f"domain_shift:{seed}")
    return [{"text": _recipe(rng)} for _ in range(n)]


# --------------------------------------------------------------------------- #
# Sentiment classification
# --------------------------------------------------------------------------- #
_SUBJECTS = ("film", "book", "hotel", "restaurant", "phone", "laptop", "game", "album", "coffee", "jacket",
             "camera", "course", "concert", "app", "bike", "headphones")
_POSITIVE = ("wonderful", "excellent", "delightful", "brilliant", "great", "lovely", "superb", "fantastic",
             "charming", "reliable", "impressive", "enjoyable", "comfortable", "friendly", "beautiful", "solid")
_NEGATIVE = ("terrible", "awful", "disappointing", "dreadful", "poor", "boring", "broken", "rude", "flimsy",
             "unreliable", "annoying", "dull", "overpriced", "uncomfortable", "ugly", "horrible")
_INTENSIFIERS = ("", "really ", "truly ", "very ", "quite ", "absolutely ", "rather ")
_OPENERS = ("I tried the {s} last week.", "We picked this {s} on a whim.", "My friend recommended the {s}.",
            "I have used this {s} for a month.", "Finally got around to the {s}.", "")
_POS_CLOSERS = ("I would recommend it to anyone.", "Five stars from me.", "Worth every penny.",
                "I will be back for more.", "Highly recommended.")
_NEG_CLOSERS = ("I would not recommend it.", "One star from me.", "A waste of money.",
                "I will not be back.", "Avoid it if you can.")
_SENTENCES = ("The {s} was {i}{w}.", "Honestly, it is a {i}{w} {s}.", "What a {i}{w} {s}!",
              "Everything about the {s} felt {i}{w}.", "The staff said it was {w}, and they were right.")


def _review(rng: random.Random, label: int) -> str:
    """One review whose sentiment words all agree with ``label`` (1 = positive)."""
    subject = rng.choice(_SUBJECTS)
    own, other = (_POSITIVE, _NEGATIVE) if label == 1 else (_NEGATIVE, _POSITIVE)
    parts = [rng.choice(_OPENERS).format(s=subject)]
    if rng.random() < 0.2:
        # Negated opposite word, e.g. "It was not boring at all." for a positive review.
        parts.append(f"It was not {rng.choice(other)} at all.")
    for _ in range(rng.randint(1, 2)):
        parts.append(rng.choice(_SENTENCES).format(s=subject, i=rng.choice(_INTENSIFIERS), w=rng.choice(own)))
    if rng.random() < 0.7:
        parts.append(rng.choice(_POS_CLOSERS if label == 1 else _NEG_CLOSERS))
    return " ".join(p for p in parts if p)


def generate_sentiment(n: int, seed: int) -> list[Row]:
    """Generate ``n`` labelled reviews for binary sentiment classification.

    Labels are balanced in every consecutive pair of rows (one of each, in
    random order).

    Args:
        n: Number of rows.
        seed: Seed; same ``(n, seed)`` gives the same rows.

    Returns:
        Rows ``{"text": review, "label": 1 (positive) or 0 (negative)}``.
    """
    _check_n(n)
    rng = random.Random(f"sentiment:{seed}")
    rows: list[Row] = []
    while len(rows) < n:
        pair = [0, 1]
        rng.shuffle(pair)
        for label in pair[: n - len(rows)]:
            rows.append({"text": _review(rng, label), "label": label})
    return rows


# --------------------------------------------------------------------------- #
# Registry, bundled files and CLI
# --------------------------------------------------------------------------- #
TASKS: dict[str, Callable[[int, int], list[Row]]] = {
    "one_more": generate_one_more,
    "arithmetic": generate_arithmetic,
    "domain_shift": generate_domain_shift,
    "sentiment": generate_sentiment,
}

#: Where the bundled task data lives.
BUNDLED_DATA = BUNDLED_DIR / "data"
#: ``file name -> (task, n, seed)`` of the files shipped in ``lorakit/bundled/data``.
#: Eval files use a different seed and drop rows that also occur in the train file; a task in
#: :data:`HELDOUT_GENERATORS` draws its eval rows from that generator instead (``one_more``: held-out names).
BUNDLED_FILES: dict[str, tuple[str, int, int]] = {
    "one_more_train.jsonl": ("one_more", 2000, 0),
    "one_more_eval.jsonl": ("one_more", 200, 1),
    "arithmetic_train.jsonl": ("arithmetic", 2000, 0),
    "arithmetic_eval.jsonl": ("arithmetic", 200, 1),
    "domain_train.jsonl": ("domain_shift", 1000, 0),
    "domain_eval.jsonl": ("domain_shift", 200, 1),
    "sentiment_train.jsonl": ("sentiment", 1000, 0),
    "sentiment_eval.jsonl": ("sentiment", 200, 1),
}


#: ``task -> generator`` of the rows of that task's bundled eval file, where they differ from :data:`TASKS`.
HELDOUT_GENERATORS: dict[str, Callable[[int, int], list[Row]]] = {"one_more": _generate_one_more_heldout}


def _row_key(row: Row) -> str:
    """The field that identifies a row for train/eval de-duplication."""
    return str(row.get("prompt", row.get("text")))


def _generate_disjoint(task: str, n: int, seed: int, exclude: set[str]) -> list[Row]:
    """Generate ``n`` eval rows of ``task`` whose keys are not in ``exclude`` (nor repeated)."""
    generator = HELDOUT_GENERATORS.get(task, TASKS[task])
    size = n
    while True:
        rows, seen = [], set(exclude)
        for row in generator(size, seed):
            key = _row_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
            if len(rows) == n:
                return rows
        size *= 2


def write_bundled_data(directory: str | Path) -> list[Path]:
    """(Re)write every file of :data:`BUNDLED_FILES` into ``directory``.

    Returns:
        The written paths.
    """
    directory = Path(directory)
    written: list[Path] = []
    train_keys: dict[str, set[str]] = {}
    for name, (task, n, seed) in BUNDLED_FILES.items():
        if name.endswith("_train.jsonl"):
            rows = TASKS[task](n, seed)
            train_keys[task] = {_row_key(r) for r in rows}
        else:
            rows = _generate_disjoint(task, n, seed, train_keys.get(task, set()))
        written.append(write_jsonl(rows, directory / name))
    return written
