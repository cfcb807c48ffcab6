"""Writes tests/data/untagged_memory.jsonl: an invented MCP-memory-server file with no emotion tag line and
no reflection/lesson node, the shape most real users' files have (issue 13).

120 entities of kinds project / person / paper / concept (garden projects, papers, the people around
them). Observations are strings, and for one entity in three some are `{"text", "timestamp"}` objects
(the mcp-think-tank fork's shape). Relations link people to projects and papers, papers to concepts, and
a few point at names that were never created (older servers wrote those). Deterministic: a fixed seed,
no clock. Run `python tests/data/make_untagged_memory.py` to rewrite the file.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

OUT = Path(__file__).with_name("untagged_memory.jsonl")
SEED = 13
N_PER_KIND = {"project": 30, "person": 35, "paper": 30, "concept": 25}
MISSING = ["Old Orchard Survey", "Grandma's Recipe Book", "Community Seed Swap", "Soil Lab (closed)"]

PLANTS = [
    "tomato",
    "runner bean",
    "kale",
    "garlic",
    "rhubarb",
    "sweet pea",
    "courgette",
    "apple",
    "sorrel",
    "chard",
    "leek",
    "strawberry",
]
PLACES = [
    "the allotment",
    "the north bed",
    "the greenhouse",
    "the school garden",
    "the roof terrace",
    "the orchard strip",
    "the shed corner",
]
FIRST = [
    "Ada",
    "Bram",
    "Cleo",
    "Dev",
    "Esme",
    "Femi",
    "Gus",
    "Hana",
    "Ivo",
    "Juno",
    "Kai",
    "Lior",
    "Mina",
    "Nico",
    "Oona",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sami",
    "Tove",
]
LAST = ["Marsh", "Holloway", "Reyes", "Okafor", "Lind", "Varga", "Brook", "Tanaka", "Moss", "Quill"]
TOPICS = [
    "mulching",
    "companion planting",
    "drip irrigation",
    "crop rotation",
    "seed saving",
    "no-dig beds",
    "pollinator strips",
    "cold frames",
    "leaf mould",
    "green manure",
    "rainwater harvesting",
]

PROJECT_NOTES = [
    "Started clearing {place} for {plant} in early spring",
    "The {plant} seedlings came up unevenly; reseeded the gaps",
    "Budget so far is small: mostly reclaimed timber and donated compost",
    "Volunteers meet on Saturday mornings to weed and water",
    "Trying {topic} this year after reading about it",
    "Harvest was better than last year, especially the {plant}",
    "Reference: https://example.org/garden/{slug}",
    "Next step: build a second compost bay beside {place}",
]
PERSON_NOTES = [
    "Looks after {place} most weekends",
    "Knows a lot about {topic} and shares cuttings freely",
    "Prefers growing {plant} from seed rather than buying plants",
    "Joined the group two seasons ago through a neighbour",
    "Asked for help with slugs on the {plant} bed",
    "Keeps careful notes on sowing dates in a paper notebook",
]
PAPER_NOTES = [
    "Field trial of {topic} on clay soil over three seasons",
    "Finds {plant} yields rise with {topic} but only in dry years",
    "Year: {year}",
    "Small sample; the authors say so themselves",
    "Cited by the allotment newsletter in the spring issue",
    "URL: https://example.org/papers/{slug}",
]
CONCEPT_NOTES = [
    "{topic} means less watering once established",
    "Works best when started in autumn before the ground freezes",
    "Often confused with a related practice; the difference is in timing",
    "Needs patience: the benefit shows after a season or two",
]


def _slug(name: str) -> str:
    return "-".join(name.lower().replace("'", "").split())


def _names(rng: random.Random) -> dict[str, list[str]]:
    people = sorted({f"{rng.choice(FIRST)} {rng.choice(LAST)}" for _ in range(200)})[: N_PER_KIND["person"]]
    projects = [
        f"{p.title()} Project {i + 1}" for i, p in enumerate(rng.choices(PLANTS, k=N_PER_KIND["project"]))
    ]
    papers = [
        f"On {t.title()} and {p.title()} ({2001 + i})"
        for i, (t, p) in enumerate(
            zip(
                rng.choices(TOPICS, k=N_PER_KIND["paper"]),
                rng.choices(PLANTS, k=N_PER_KIND["paper"]),
                strict=True,
            )
        )
    ]
    rounds = ("Basics", "In Practice", "Advanced")
    concepts = [
        f"{t.title()} {rounds[i // len(TOPICS)]}" for i, t in enumerate((TOPICS * 3)[: N_PER_KIND["concept"]])
    ]
    return {"project": projects, "person": people, "paper": papers, "concept": concepts}


def _observations(rng: random.Random, kind: str, name: str, index: int, start: datetime) -> list:
    templates = {
        "project": PROJECT_NOTES,
        "person": PERSON_NOTES,
        "paper": PAPER_NOTES,
        "concept": CONCEPT_NOTES,
    }[kind]
    fill = {
        "place": rng.choice(PLACES),
        "plant": rng.choice(PLANTS),
        "topic": rng.choice(TOPICS),
        "year": 2001 + index % 24,
        "slug": _slug(name),
    }
    texts = [t.format(**fill) for t in rng.sample(templates, k=rng.randint(2, min(4, len(templates))))]
    if index % 3 != 0:
        return texts
    # the think-tank shape: some observations are objects with their own timestamp
    out: list = []
    for j, text in enumerate(texts):
        stamp = start + timedelta(days=index, hours=j)
        out.append({"text": text, "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ")} if j % 2 == 0 else text)
    return out


def build() -> list[dict]:
    """The file's records, entities first, then relations."""
    rng = random.Random(SEED)
    names = _names(rng)
    start = datetime(2025, 3, 1, tzinfo=timezone.utc)
    records: list[dict] = []
    for kind, kind_names in names.items():
        for i, name in enumerate(kind_names):
            records.append(
                {
                    "type": "entity",
                    "name": name,
                    "entityType": kind,
                    "observations": _observations(rng, kind, name, i + len(records), start),
                }
            )
    relations = set()
    for person in names["person"]:
        relations.add((person, rng.choice(names["project"]), "works_on"))
        relations.add((person, rng.choice(names["paper"]), "read"))
    for paper in names["paper"]:
        relations.add((paper, rng.choice(names["concept"]), "discusses"))
    for project in names["project"]:
        relations.add((project, rng.choice(names["concept"]), "applies"))
    for i, missing in enumerate(MISSING):  # relations to entities the file never created
        relations.add((names["project"][i], missing, "inspired_by"))
    for src, dst, rel in sorted(relations):
        records.append({"type": "relation", "from": src, "to": dst, "relationType": rel})
    return records


def main() -> None:
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build()), encoding="utf-8")


if __name__ == "__main__":
    main()
