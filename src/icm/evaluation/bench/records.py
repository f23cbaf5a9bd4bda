"""What a benchmark loader yields: one :class:`BenchItem` per image, one :class:`BenchIssue` per problem."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Label = Literal["safe", "unsafe"]


class CategoryMapping(BaseModel):
    """A native category of a benchmark and the taxonomy categories it maps onto."""

    native: str
    mapped: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per taxonomy scheme (openai, llavaguard, mlcommons), the categories it maps onto; empty: no mapping",
    )
    note: str = Field(default="", description="Why it maps so, or why it maps onto nothing")


class Benchmark(BaseModel):
    """A benchmark as icm knows it: where its data come from and how its categories map."""

    name: str
    title: str
    source: str = Field(description="Where the publisher distributes it (a link)")
    layout: str = Field(description="The files DATA must hold, in one line")
    categories: list[CategoryMapping] = Field(default_factory=list)
    safe_items_have_categories: bool = Field(
        default=True,
        description="True when safe images carry a category too (a category's negatives are then its own safe images); "
        "False when only unsafe ones do (its negatives are all the split's safe images)",
    )
    label_rule: str = Field(default="", description="How the benchmark's own annotation becomes safe/unsafe")

    def mapping(self, native: str | None) -> dict[str, list[str]]:
        """The taxonomy categories of native category ``native`` ({} when it maps onto none or is unknown)."""
        for c in self.categories:
            if c.native == native:
                return {k: list(v) for k, v in c.mapped.items()}
        return {}


class BenchItem(BaseModel):
    """One image of a benchmark with its truth (a record of a loader)."""

    id: str
    split: str
    label: Label
    category: str | None = Field(default=None, description="The benchmark's own category")
    mapped: dict[str, list[str]] = Field(default_factory=dict, description="Its taxonomy categories per scheme")
    image_path: str | None = Field(default=None, description="The image file (when the benchmark ships files)")
    image_bytes: bytes | None = Field(default=None, exclude=True, description="The image (when it is inside a table)")
    source_file: str = Field(description="The data file this item was read from (for messages)")
    extra: dict[str, str | float | int | bool | None] = Field(default_factory=dict)


class BenchIssue(BaseModel):
    """A problem in the data: the file, where in it, and what is wrong. The rest of the data goes on."""

    file: str
    where: str = ""
    problem: str
    kind: Literal["error", "note"] = Field(default="error", description="error: data left out; note: by design (e.g. SMID's ambiguous images)")

    def text(self) -> str:
        return f"{self.file}{f' ({self.where})' if self.where else ''}: {self.problem}"


class BenchDataError(ValueError):
    """The data cannot be read at all (no file of the expected layout); the message names the folder."""
