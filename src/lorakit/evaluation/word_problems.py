"""Word-problem task generators: multi-step arithmetic (GSM8K-like, scored by :func:`extract_answer`) and the
demo's one-more / one-fewer problems (held-out names for its eval file). See :mod:`lorakit.evaluation.tasks`."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]

_NAMES = (
    "Ada", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jon", "Kim", "Leo", "Mia", "Nia",
    "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wen", "Yara", "Zoe",
)


def check_n(n: int) -> None:
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
    check_n(n)
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
    check_n(n)
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


def generate_one_more_heldout(n: int, seed: int) -> list[Row]:
    """``one_more`` rows with the held-out names only (the bundled eval file)."""
    return generate_one_more(n, seed, names=ONE_MORE_HELDOUT_NAMES)
