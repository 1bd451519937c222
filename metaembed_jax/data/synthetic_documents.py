"""Document pages of the synthetic dataset: an entity's facts and a small table, the question
about one fact, and the hard negative page that changes exactly that fact (`synthetic.py`'s
`documents` task)."""

from __future__ import annotations

import dataclasses

from metaembed_jax.data import synthetic_render as render

KINDS = tuple(render.HEADER_COLORS)
METRICS = ("revenue", "profit", "visitors", "budget", "exports", "members")
_SYLLABLES = (
    "va", "lo", "ri", "bren", "nix", "tor", "ka", "mel", "zu", "sa", "dor", "fen", "qui", "lan",
    "mor", "pel", "tek", "vo", "yar", "gal", "ost", "ber", "cin", "dra", "el", "fa", "gru", "hal",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Document:
    """A page: entity name, kind, two facts and a table `values[year][metric]`."""

    entity: str
    kind: str
    founded: int
    staff: int
    years: tuple[int, ...]
    metrics: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]

    def signature(self) -> tuple:
        fields = (self.entity, self.kind, self.founded, self.staff)
        return ("document", fields, self.years, self.metrics, self.values)


def _entity_name(rng) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()


def make_document(rng) -> Document:
    years = tuple(sorted(rng.sample(range(2000, 2025), 3)))
    metrics = tuple(rng.sample(METRICS, 2))
    values = tuple(tuple(rng.randint(10, 999) for _ in metrics) for _ in years)
    kind, founded, staff = rng.choice(KINDS), rng.randint(1850, 1999), rng.randint(5, 9999)
    return Document(_entity_name(rng), kind, founded, staff, years, metrics, values)


def perturb_document(doc: Document, rng) -> tuple[Document, str]:
    """(hard negative page, question): the negative changes one field the question names."""
    fact = rng.choice(("table", "table", "founded", "staff"))
    change = rng.choice(("entity", "year", "metric")) if fact == "table" else "entity"
    if fact == "table":
        i, j = rng.randrange(len(doc.years)), rng.randrange(len(doc.metrics))
        question = f"What was the {doc.metrics[j]} of {doc.entity} in {doc.years[i]}?"
    elif fact == "founded":
        question = f"In which year was {doc.entity} founded?"
    else:
        question = f"How many staff does {doc.entity} have?"
    if change == "entity":
        return dataclasses.replace(doc, entity=_other_entity(doc.entity, rng)), question
    if change == "year":
        year = rng.choice([y for y in range(2000, 2025) if y not in doc.years])
        years = doc.years[:i] + (year,) + doc.years[i + 1 :]
        return dataclasses.replace(doc, years=years), question
    metric = rng.choice([m for m in METRICS if m not in doc.metrics])
    metrics = doc.metrics[:j] + (metric,) + doc.metrics[j + 1 :]
    return dataclasses.replace(doc, metrics=metrics), question


def _other_entity(entity: str, rng) -> str:
    while (name := _entity_name(rng)) == entity:
        pass
    return name


def document_texts(doc: Document) -> list[str]:
    """The words printed on a page (for the tokenizer)."""
    lines = [doc.entity, f"A {doc.kind}, founded {doc.founded}.", f"Staff: {doc.staff}."]
    lines.append(" ".join(["Year", *(m.capitalize() for m in doc.metrics)]))
    lines += [" ".join(map(str, (y, *v))) for y, v in zip(doc.years, doc.values, strict=True)]
    return lines
