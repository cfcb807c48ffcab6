"""The built-in sample memory graph: deterministic, generated from templates and a seeded RNG.

It stands in for a researcher's real memory graph so that the whole pipeline runs offline. What
matters for the downstream science:

- several hundred nodes of five kinds (journal, digest, pattern, reflection, lesson), linked the
  way a memory server links them (digests summarise journals, patterns are derived from entries,
  lessons are learned from patterns, journals follow each other, related moods are linked);
- a trailing tag line over 16 emotions whose scores come from latent *moods*, so emotions co-occur
  as they do in real data (warmth with love, frustration with tiredness);
- wording that carries the mood (a warm node talks about warm things; it seldom names the emotion
  outright), so steering vectors learned from the pairs have real signal;
- some nodes without a tag line, and some with low "noise" tags.

The records are the MCP memory server's JSONL records (`type`/`name`/`entityType`/`observations`
and `type`/`from`/`to`/`relationType`), so the sample goes through the same ingestion as real data.
Generation takes a few milliseconds.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from carl_assets.storage import atomic_write_text

SAMPLE_SEED = 20260501
KIND_COUNTS = {"journal": 210, "reflection": 70, "pattern": 55, "digest": 40, "lesson": 45}
UNTAGGED_FRACTION = 0.12

# Latent moods: the emotions that rise together, and how often each mood leads a node.
MOODS: dict[str, tuple[tuple[str, ...], float]] = {
    "tender": (("warmth", "love", "gratitude"), 0.14),
    "spent": (("frustration", "tiredness"), 0.14),
    "bright": (("curiosity", "joy", "clarity"), 0.13),
    "uneasy": (("anxiety", "confusion"), 0.11),
    "low": (("sadness", "loneliness", "tiredness"), 0.10),
    "steady": (("calm", "clarity"), 0.11),
    "proud": (("pride", "joy", "gratitude"), 0.09),
    "wonder": (("awe", "curiosity", "hope"), 0.09),
    "hopeful": (("hope", "warmth"), 0.09),
}
EMOTIONS = sorted({e for members, _ in MOODS.values() for e in members})

PEOPLE = ["Mara", "Jonah", "Priya", "Tomas", "Elena", "Sam", "Ines", "Kofi", "Ruth", "Leo", "my sister",
          "my father"]
TOPICS = [
    "the tokenizer refactor", "the evaluation harness", "the gradient spikes", "the memory server",
    "the attention probe", "the training loop", "the dream scheduler", "the reward model",
    "the data cleaning script", "the layer sweep", "the paper draft", "the conference talk",
    "the steering experiment", "the checkpoint migration", "the benchmark numbers", "the onboarding notes",
]
PLACES = [
    "the kitchen", "the train home", "the library", "the garden", "the lab", "the river path",
    "the cafe on the corner", "the balcony", "the quiet office", "the park bench",
]
TIMES = ["this morning", "late at night", "after lunch", "before dawn", "in the evening", "around noon"]

# Sentences that carry each emotion. Most convey it without naming it.
PHRASES: dict[str, list[str]] = {
    "warmth": [
        "{person} brought me tea in {place} and we sat close, wrapped in blankets, laughing softly.",
        "There was a soft, sunlit kindness in how {person} listened, and I felt held.",
        "A gentle hug from {person} at the door made the whole evening glow.",
        "The room felt cosy and kind, like a fire had been lit for everyone in it.",
        "I felt a real warmth toward the whole team when they stayed to help with {topic}.",
        "{person} squeezed my hand and said they were glad I was there; it stayed with me all day.",
        "We shared soup and stories in {place}, and everyone leaned in toward each other.",
    ],
    "love": [
        "I adore {person}, and watching them laugh in {place} filled my chest.",
        "Being with {person} feels like coming home; I would choose them again every time.",
        "My heart swelled when {person} fell asleep on my shoulder in {place}.",
        "I told {person} how much they mean to me, and they held me for a long time.",
        "Devotion is a quiet thing: making breakfast for {person} without being asked.",
        "I love the way {person} hums when they cook, and I said so out loud.",
    ],
    "gratitude": [
        "I am thankful that {person} took the time to review {topic} so carefully.",
        "So many small kindnesses today; I wrote a note to thank {person} for each of them.",
        "Grateful, honestly, for the people who carried me through {topic}.",
        "I keep counting my blessings: good friends, a quiet room, and help when I asked for it.",
        "{person} did not have to help with {topic}, and I want to remember that they did.",
        "Thank you, {person}, for the patience; it made all the difference.",
    ],
    "frustration": [
        "{topic_cap} broke again for the third time and I slammed the laptop shut.",
        "Nothing worked; every fix to {topic} created two new failures and I wanted to scream.",
        "I am fed up with waiting on {topic}; the same error keeps coming back no matter what I try.",
        "Annoyed and stuck: the build failed on a typo after an hour of rebuilding.",
        "The meeting went in circles again and nobody would decide anything about {topic}.",
        "So much frustration with {topic} today; I kept hitting the same wall.",
        "I gritted my teeth through another pointless rerun of {topic}.",
    ],
    "tiredness": [
        "My eyes ache and my body is heavy; I have been running on four hours of sleep.",
        "Exhausted after {topic}, I could barely keep my head up in {place}.",
        "Drained, yawning, and slow all day, I kept rereading the same paragraph.",
        "I am worn out; even making dinner felt like climbing a hill.",
        "The tiredness sat behind my eyes all afternoon like fog.",
        "Too sleepy to think clearly, I gave up on {topic} and lay down.",
    ],
    "curiosity": [
        "I wonder why {topic} behaves differently on long inputs; I want to dig into it.",
        "A strange pattern in {topic} caught my eye and I could not stop poking at it.",
        "I spent {time} asking questions about how {topic} actually works underneath.",
        "What would happen if we reversed the order? I sketched three experiments to find out.",
        "Every answer about {topic} opened two more questions, and I loved chasing them.",
        "I followed a rabbit hole about {topic} and came out with a notebook full of ideas.",
    ],
    "joy": [
        "I laughed out loud when {topic} finally ran end to end, and danced around {place}.",
        "Pure delight: {person} and I sang in the car all the way home.",
        "The day felt light and bright, full of small happy surprises.",
        "I was grinning for an hour after {person} told me the good news.",
        "Everything sparkled today; even the rain felt playful.",
        "We celebrated {topic} with cake in {place} and could not stop smiling.",
    ],
    "clarity": [
        "Suddenly the structure of {topic} was obvious, and I could see every step clearly.",
        "I wrote the plan in five lines; each part of {topic} now has one clear owner.",
        "The fog lifted: the bug in {topic} was a single off-by-one, plain as day.",
        "I understood precisely what mattered and what could wait.",
        "Everything about {topic} clicked into place in {time}; the next steps are simple.",
        "Sharp, focused thinking: I found the root cause of {topic} and wrote it down.",
    ],
    "anxiety": [
        "My stomach was in knots before the review of {topic}; I kept checking the clock.",
        "I lay awake worrying that {topic} would fail in front of everyone.",
        "Racing heart, shallow breath, and a dread I could not name all afternoon.",
        "What if the deadline slips? What if I missed something in {topic}? The worries looped.",
        "I felt on edge and jumpy, refreshing my inbox every few minutes.",
        "The anxiety about {topic} made it hard to eat lunch.",
    ],
    "confusion": [
        "I do not understand why {topic} gives different answers each run; nothing adds up.",
        "The notes contradict each other and I am lost about which version of {topic} is right.",
        "I read the explanation three times and it still made no sense to me.",
        "Puzzled and muddled: the numbers from {topic} point in opposite directions.",
        "I could not tell whether the mistake was mine or in {topic}, and went around in circles.",
        "Everything about {topic} felt tangled, like a knot I could not find the end of.",
    ],
    "sadness": [
        "I cried quietly in {place} and could not say exactly why.",
        "A heavy grey feeling followed me all day; the songs I usually love sounded sad.",
        "I miss how things used to be with {person}, and the missing aches.",
        "Losing {topic} after all that work left me feeling hollow and down.",
        "The old photos made me tearful; so much has changed and some of it is gone.",
        "Gloomy weather, gloomy heart; I stared out of the window for a long time.",
    ],
    "loneliness": [
        "The flat was silent all weekend and nobody called.",
        "I ate dinner alone again and talked to no one from morning to night.",
        "Everyone seemed to have somewhere to be except me; I felt invisible in {place}.",
        "I typed a message to {person}, then deleted it, and sat alone with the quiet.",
        "It is strange to be surrounded by people and still feel so isolated.",
        "A long empty evening, and the loneliness filled every corner of the room.",
    ],
    "calm": [
        "I sat in {place} and breathed slowly; everything felt still and unhurried.",
        "A quiet, even afternoon: I worked on {topic} without any rush.",
        "The lake was flat and I felt settled, at peace with how things are.",
        "Nothing needed fixing {time}; I let the hours pass gently.",
        "I moved through {topic} steadily, one small step at a time, with a relaxed mind.",
        "Slow tea, soft rain, a calm mind.",
    ],
    "pride": [
        "I shipped {topic} and it works; I built that myself and I am proud of it.",
        "{person} said my talk on {topic} was the best of the day, and I stood a little taller.",
        "Looking back at how far {topic} has come, I feel I earned this.",
        "I finally finished the marathon training block without missing a session.",
        "The review of {topic} came back with no changes requested, a first for me.",
        "I held my ground in the meeting and my argument about {topic} carried the room.",
    ],
    "awe": [
        "The night sky over {place} was enormous, and I felt tiny and amazed beneath it.",
        "Watching the storm roll in over the hills left me speechless.",
        "It is astonishing that {topic} works at all; billions of tiny steps adding up to meaning.",
        "The cathedral ceiling rose so high that I simply stood and stared.",
        "I was struck silent by the scale of the ocean at dawn.",
        "Something vast and beautiful opened up while I read about {topic}.",
    ],
    "hope": [
        "Tomorrow might be better; the first results on {topic} point the right way.",
        "I can see a path forward with {topic} now, and it feels possible.",
        "Maybe this is the start of something good with {person}.",
        "Spring is coming, and I am looking forward to what we will build next.",
        "Even after a rough week, I believe {topic} will come together.",
        "There is a small, stubborn light in me that says keep going.",
    ],
}

NEUTRAL = [
    "I wrote down the numbers afterwards and filed them with the rest.",
    "The rest of the afternoon went to email and small chores.",
    "We moved the weekly sync to Thursday.",
    "I reorganised the notes folder and renamed a few files.",
    "Lunch was a sandwich at my desk.",
    "The bus was late, so I read on the way.",
    "I updated the checklist for {topic}.",
    "{person} asked about the schedule for next week.",
    "I spent an hour in {place} going through old messages.",
    "The logs from {topic} are archived under this week's date.",
    "I need to order new notebooks.",
    "There was a short power cut around {time_noon}.",
]

OPENERS = {
    "journal": ["Journal, {date}.", "{date}, {time}.", "Entry for {date}.", "{date_cap}: a day of {topic}."],
    "reflection": [
        "Reflecting on {topic} a few days later.", "Looking back at {date}.",
        "A reflection on the week around {topic}.", "Thinking again about what happened with {person}.",
    ],
    "digest": ["Digest of the week of {date}.", "Weekly digest: {topic} and the rest.",
               "Summary of entries around {date}."],
    "pattern": [
        "Pattern: when {topic} stalls, the same feeling comes back.", "A recurring pattern around {topic}.",
        "Pattern noticed across several entries.", "Pattern: days with {person} tend to feel the same way.",
    ],
    "lesson": [
        "Lesson learned from {topic}.", "Lesson: write it down before it fades.",
        "What I want to remember from {topic}.", "Lesson about myself and {topic}.",
    ],
}
CLOSERS = {
    "journal": ["", "", "More tomorrow.", "Going to bed now."],
    "reflection": ["It looks different from here.", "I understand it a little better now.", ""],
    "digest": ["Most entries this week share the same tone.", "Three entries stood out.", ""],
    "pattern": ["It has happened at least four times now.", "Worth watching for next time.", ""],
    "lesson": ["Next time, notice it earlier.", "Keep this close.", ""],
}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]


def _pick_mood(rng: random.Random, exclude: str | None = None) -> str:
    names = [m for m in MOODS if m != exclude]
    return rng.choices(names, weights=[MOODS[m][1] for m in names])[0]


def _fill(template: str, rng: random.Random, topic: str, person: str, date: str) -> str:
    place = rng.choice(PLACES)
    return template.format(
        topic=topic, topic_cap=topic[0].upper() + topic[1:], person=person, place=place,
        time=rng.choice(TIMES), time_noon=rng.choice(["noon", "three o'clock", "half past four"]),
        date=date, date_cap=date[0].upper() + date[1:],
    )


def _tags(rng: random.Random, primary: str, secondary: str | None) -> dict[str, int]:
    tags: dict[str, int] = {}
    lead, *rest = MOODS[primary][0]
    tags[lead] = rng.randint(8, 10)
    for emotion in rest:
        if rng.random() < 0.85:
            tags[emotion] = rng.randint(6, 10)
    if secondary:
        for emotion in MOODS[secondary][0]:
            if emotion not in tags and rng.random() < 0.7:
                tags[emotion] = rng.randint(3, 7)
    for emotion in rng.sample(EMOTIONS, rng.randint(0, 2)):  # faint background feelings
        tags.setdefault(emotion, rng.randint(1, 3))
    return tags


def _node(rng: random.Random, kind: str, index: int) -> tuple[dict[str, Any], str]:
    primary = _pick_mood(rng)
    secondary = _pick_mood(rng, exclude=primary) if rng.random() < 0.3 else None
    topic, person = rng.choice(TOPICS), rng.choice(PEOPLE)
    date = f"{MONTHS[(index // 28) % len(MONTHS)]} {index % 28 + 1}"
    fill = lambda t: _fill(t, rng, topic, person, date)  # noqa: E731
    sentences = [fill(rng.choice(OPENERS[kind]))]
    lead, *rest = MOODS[primary][0]
    feelings = [lead] + rng.sample(rest, k=min(len(rest), rng.randint(1, 2)))
    if secondary:
        feelings.append(rng.choice(MOODS[secondary][0]))
    tail = [fill(rng.choice(PHRASES[e])) for e in feelings[1:]]
    tail += [fill(t) for t in rng.sample(NEUTRAL, rng.randint(0, 2))]
    rng.shuffle(tail)  # the lead feeling comes first; the rest in any order
    sentences += [fill(rng.choice(PHRASES[lead]))] + tail
    if closer := rng.choice(CLOSERS[kind]):
        sentences.append(closer)
    sentences = [s[0].upper() + s[1:] for s in sentences]
    # Journals are one observation; the other kinds are split into several, as agents write them.
    if kind == "journal":
        observations = [" ".join(sentences)]
    else:
        cut = rng.randint(1, len(sentences) - 1) if len(sentences) > 1 else 1
        observations = [" ".join(sentences[:cut]), " ".join(sentences[cut:])]
        observations = [o for o in observations if o]
    if rng.random() >= UNTAGGED_FRACTION:
        tags = _tags(rng, primary, secondary)
        items = list(tags.items())
        rng.shuffle(items)
        observations.append(" ".join(f"{e}:{s}" for e, s in items))
    name = f"{kind}-{index:03d}"
    return {"type": "entity", "name": name, "entityType": kind, "observations": observations}, primary


def sample_records(seed: int = SAMPLE_SEED) -> list[dict[str, Any]]:
    """The sample graph as MCP memory-server JSONL records: entities first, then relations."""
    rng = random.Random(seed)
    entities: list[dict[str, Any]] = []
    mood_of: dict[str, str] = {}
    by_kind: dict[str, list[str]] = {}
    for kind, count in KIND_COUNTS.items():
        for index in range(count):
            entity, mood = _node(rng, kind, index)
            entities.append(entity)
            mood_of[entity["name"]] = mood
            by_kind.setdefault(kind, []).append(entity["name"])

    relations: list[tuple[str, str, str]] = []
    journals = by_kind["journal"]
    relations += [(b, a, "follows") for a, b in zip(journals, journals[1:], strict=False)]
    for i, digest in enumerate(by_kind["digest"]):  # each digest covers a run of journals
        start = (i * len(journals)) // len(by_kind["digest"])
        relations += [(digest, j, "summarizes") for j in journals[start:start + rng.randint(3, 6)]]
    for reflection in by_kind["reflection"]:
        relations += [(reflection, j, "reflects_on") for j in rng.sample(journals, rng.randint(1, 2))]
    entries = journals + by_kind["reflection"]
    for pattern in by_kind["pattern"]:  # patterns gather entries that share their mood
        same = [e for e in entries if mood_of[e] == mood_of[pattern]] or entries
        picked = rng.sample(same, min(len(same), rng.randint(2, 4)))
        relations += [(pattern, e, "derived_from") for e in picked]
    sources = by_kind["pattern"] + by_kind["reflection"]
    for lesson in by_kind["lesson"]:
        relations += [(lesson, s, "learned_from") for s in rng.sample(sources, rng.randint(1, 2))]
    names = [e["name"] for e in entities]
    for _ in range(60):  # loose associations across kinds, mostly between like moods
        a = rng.choice(names)
        pool = [n for n in names if n != a and mood_of[n] == mood_of[a]] if rng.random() < 0.75 else names
        b = rng.choice([n for n in pool if n != a])
        relations.append((a, b, "relates_to"))

    seen: set[tuple[str, str, str]] = set()
    unique = [r for r in relations if not (r in seen or seen.add(r))]
    return entities + [{"type": "relation", "from": a, "to": b, "relationType": rel} for a, b, rel in unique]


def write_sample_jsonl(path: str | Path, seed: int = SAMPLE_SEED) -> Path:
    """Write the sample graph as an MCP memory-server JSONL file (e.g. to seed a real server with it:
    point the server's `MEMORY_FILE_PATH` at the file)."""
    lines = [json.dumps(record, ensure_ascii=False) for record in sample_records(seed)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":  # python -m carl_assets.memory.sample memory.jsonl
    if len(sys.argv) != 2:
        sys.exit("usage: python -m carl_assets.memory.sample OUTPUT.jsonl")
    print(write_sample_jsonl(sys.argv[1]))
