"""Text task generators: templated cooking recipes (a domain shift for continued pretraining and forgetting) and
labelled reviews (sequence classification). See :mod:`lorakit.evaluation.tasks`."""

from __future__ import annotations

import random

from lorakit.evaluation.word_problems import Row, check_n

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
    check_n(n)
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
    check_n(n)
    rng = random.Random(f"sentiment:{seed}")
    rows: list[Row] = []
    while len(rows) < n:
        pair = [0, 1]
        rng.shuffle(pair)
        for label in pair[: n - len(rows)]:
            rows.append({"text": _review(rng, label), "label": label})
    return rows
