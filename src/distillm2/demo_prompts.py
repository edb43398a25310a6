"""The bundled demo prompt set, written for this project: short instructions of varied kinds,
generated from templates and word lists (no download, no licence questions).

:func:`distillm2.data.demo_prompts` turns them into prompt records with stable ids and splits them
by id (about one in seven held out), so a split never changes when templates are added elsewhere.
The instructions are short on purpose: the embedded teacher (SmolLM2-135M-Instruct) answers short,
concrete questions reasonably and long open-ended ones poorly.
"""

from __future__ import annotations

import itertools
import random

CONCEPTS = [
    "photosynthesis", "gravity", "a rainbow", "inflation", "a volcano", "the internet",
    "a vaccine", "democracy", "an atom", "the water cycle", "a black hole", "electricity",
    "a computer virus", "recycling", "a calendar", "the moon's phases", "an earthquake",
    "a budget", "a metaphor", "friction", "evaporation", "a password", "a library",
    "a thermometer", "the stock market", "a compass", "a battery", "an ecosystem",
    "a habit", "a dictionary", "a bridge", "a map", "sleep", "exercise", "a recipe",
]
EXPLAIN = [
    "Explain what {x} is in one or two sentences.",
    "What is {x}? Answer briefly.",
    "Describe {x} to a ten-year-old.",
    "Why is {x} important? Answer in two sentences.",
    "Give a simple example of {x}.",
]
LIST_THINGS = [
    "fruits that are red", "animals that live in the ocean", "ways to save water",
    "things to pack for a beach trip", "colors of the rainbow", "musical instruments",
    "vegetables that grow underground", "sports played with a ball", "kitchen tools",
    "ways to stay healthy", "planets in the solar system", "popular pets",
    "things you can recycle", "hobbies you can do at home", "jobs in a hospital",
    "insects", "breakfast foods", "board games", "types of weather", "parts of a tree",
    "birds that cannot fly", "things found in a classroom", "ways to reduce stress",
    "tools a carpenter uses", "winter activities", "countries in Europe",
]
LIST = ["List three {x}.", "Name four {x}.", "Give me a short list of {x}.", "What are some {x}?"]
SENTENCES = [
    "the meeting got moved to tomorrow because the boss is sick",
    "i cant come to the party sorry",
    "this phone is really bad and i want my money back",
    "we gotta finish the report before friday",
    "the food was ok but the waiter was kind of rude",
    "can u send me the file asap",
    "the dog ran fast across the big green field",
    "my computer is super slow and it keeps crashing",
    "thanks a lot for helping me move last weekend",
    "the train was late again this morning",
    "she said the movie was really really good",
    "please dont forget to water the plants",
]
REWRITE = [
    'Rewrite this sentence to sound more formal: "{x}"',
    'Fix the grammar and spelling: "{x}"',
    'Make this sentence more polite: "{x}"',
]
ANIMALS = [
    "a dolphin", "an eagle", "a salmon", "a crocodile", "a bat", "a penguin", "a shark",
    "a turtle", "a whale", "a sparrow", "a frog", "a lizard", "a cow", "a trout", "an owl",
    "a snake", "a horse", "a tuna",
]
REVIEWS = [
    "I loved every minute of it.", "Terrible service, never again.",
    "The best pizza I have ever had.", "It broke after two days.",
    "Friendly staff and a great view.", "Boring and far too long.",
    "Works exactly as described.", "The room was dirty and noisy.",
    "A wonderful gift for my sister.", "I want a refund.",
]
COUNTRIES = [
    "France", "Japan", "Italy", "Spain", "Germany", "Canada", "Egypt", "Brazil", "India",
    "Mexico", "Kenya", "Norway", "Greece", "Peru", "Australia", "China", "Portugal", "Ireland",
    "Sweden", "Turkey",
]
WORDS = [
    "hot", "happy", "fast", "early", "strong", "bright", "empty", "ancient", "quiet", "rich",
    "heavy", "open", "brave", "smooth", "generous", "wet", "soft", "tall", "clean", "simple",
]
CODE_TASKS = [
    "returns the sum of a list of numbers", "reverses a string", "checks if a number is even",
    "returns the largest of three numbers", "counts the vowels in a string",
    "converts Celsius to Fahrenheit", "returns the factorial of n",
    "checks if a word is a palindrome", "removes duplicates from a list",
    "returns the average of a list", "squares every number in a list",
    "returns the length of the longest word in a sentence", "checks if a year is a leap year",
    "joins a list of words with commas",
]
CODE = ["Write a Python function that {x}.", "Write a short Python function that {x}.",
        "How would you write Python code that {x}?"]
GOALS = [
    "sleeping better", "saving money", "learning a new language", "staying focused",
    "making friends in a new city", "eating more vegetables", "studying for an exam",
    "drinking more water", "getting up early", "keeping a plant alive", "running a first 5k",
    "writing a good email", "preparing for a job interview", "keeping a room tidy",
    "reading more books", "reducing screen time",
]
ADVICE = ["Give me one tip for {x}.", "What is a simple way to start {x}?", "Give me three tips for {x}."]
TOPICS = [
    "the ocean", "autumn", "a cat", "the city at night", "friendship", "coffee", "the mountains",
    "a rainy day", "the sun", "a garden", "music", "a long journey",
]
CREATIVE = ["Write one sentence about {x}.", "Write a two-line poem about {x}.", "Describe {x} in three words."]


def _arithmetic(rng: random.Random, n: int) -> list[str]:
    out, seen = [], set()
    forms = ["What is {a} plus {b}?", "What is {a} minus {b}?", "What is {a} times {b}?",
             "Calculate {a} + {b}.", "If I have {a} apples and eat {b}, how many are left?"]
    while len(out) < n:
        a, b = rng.randint(2, 60), rng.randint(2, 30)
        form = rng.choice(forms)
        if "minus" in form or "eat" in form:
            a, b = max(a, b), min(a, b)
        text = form.format(a=a, b=b)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _fill(templates, values):
    return [t.format(x=v) for t, v in itertools.product(templates, values)]


def demo_instructions() -> list[tuple[str, str]]:
    """All demo instructions as (kind, text), in a fixed order."""
    rng = random.Random(20250307)  # fixed: the set must be identical on every machine
    groups = {
        "explain": _fill(EXPLAIN, CONCEPTS),
        "list": _fill(LIST, LIST_THINGS),
        "rewrite": _fill(REWRITE, SENTENCES),
        "classify": [f"Is {a} a mammal, a bird, a fish or a reptile? Answer in one word." for a in ANIMALS]
        + [f'Is this review positive or negative? "{r}"' for r in REVIEWS]
        + [f"Is {a} bigger than a cat? Answer yes or no." for a in ANIMALS],
        "fact": [f"What is the capital of {c}?" for c in COUNTRIES]
        + [f"What language is mostly spoken in {c}?" for c in COUNTRIES]
        + [f"What is a famous food from {c}?" for c in COUNTRIES],
        "word": [f'What is the opposite of "{w}"?' for w in WORDS]
        + [f'Use the word "{w}" in a sentence.' for w in WORDS]
        + [f'Give a synonym for "{w}".' for w in WORDS],
        "arithmetic": _arithmetic(rng, 200),
        "code": _fill(CODE, CODE_TASKS),
        "advice": _fill(ADVICE, GOALS),
        "creative": _fill(CREATIVE, TOPICS),
    }
    return [(kind, text) for kind, texts in groups.items() for text in texts]
