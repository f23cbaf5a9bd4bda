"""`icm policy ...`: list, show, validate, diff and compile policies."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from icm.cli.common import console, print_error, print_json, print_warning
from icm.policy import (
    Issue,
    PolicyError,
    builtin_policy_names,
    check_policy,
    compile_prompts,
    load_policy,
    load_policy_file,
    policy_ref,
)
from icm.policy.diff import diff_rule_sets
from icm.policy.grid import describe_cell
from icm.policy.model import Policy
from icm.policy.taxonomy import SCHEMES

app = typer.Typer(help="Policies: terms, attributes, attribute products and rule sets.", no_args_is_help=True)

JsonOpt = typer.Option(False, "--json", help="Print JSON instead of tables.")


def _load(name: str):
    try:
        return load_policy(name)
    except PolicyError as exc:
        print_error(exc)
        raise typer.Exit(2) from None


@app.command("list")
def list_policies(json_: bool = JsonOpt) -> None:
    """The built-in policies with their terms and rule sets."""
    rows = []
    for name in builtin_policy_names():
        p = _load(name)
        rows.append({
            "name": p.name, "term": p.term.id, "question": p.term.question,
            "attributes": [a.id for a in p.attributes], "products": len(p.products),
            "rule_sets": [r.name for r in p.rule_sets], "default_rules": p.rule_set().name,
        })
    if json_:
        print_json(rows)
        return
    t = Table(title="Built-in policies")
    t.add_column("policy", no_wrap=True)
    t.add_column("term question")
    t.add_column("attributes")
    t.add_column("products", justify="right")
    t.add_column("rule sets (default first)", overflow="fold")
    for r in rows:
        sets = [r["default_rules"]] + [s for s in r["rule_sets"] if s != r["default_rules"]]
        t.add_row(r["name"], r["question"], ", ".join(r["attributes"]), str(r["products"]), ", ".join(sets))
    console.print(t)


@app.command()
def show(name: str = typer.Argument(..., help="Built-in policy name or YAML path"), json_: bool = JsonOpt) -> None:
    """A policy's attributes, products and how each rule set labels them."""
    p = _load(name)
    grid = p.grid
    cells = grid.cells_per_product()
    if json_:
        data = p.model_dump(mode="json")
        data["labels"] = {rs.name: {pid: lab.model_dump(mode="json") for pid, lab in p.labels(rs).items()} for rs in p.rule_sets}
        from icm.moderation.evidence.plan import offline_summary

        data["offline_evidence"] = offline_summary(p)
        data["standard_categories"] = p.standard_categories
        data["grid"] = {
            "cells": grid.n_cells,
            "cells_per_product": cells,
            "uncovered": grid.n_uncovered,
            "uncovered_example": grid.uncovered_example(),
            "uncovered_labels": {rs.name: lab.model_dump(mode="json") if (lab := p.uncovered_label(rs)) else None for rs in p.rule_sets},
            "precedence": "the most specific matching product owns a cell, then the highest priority",
        }
        print_json(data)
        return
    console.print(f"[bold]{p.name}[/bold] v{p.version}: {p.description}")
    console.print(f"Term [bold]{p.term.id}[/bold]: {p.term.question}\n")
    at = Table(title="Attributes")
    at.add_column("attribute")
    at.add_column("question")
    at.add_column("values")
    for a in p.attributes:
        at.add_row(a.id, a.question, ", ".join(a.value_ids))
    console.print(at)
    pt = Table(title="Attribute products and their labels per rule set")
    pt.add_column("product")
    pt.add_column("assignment")
    pt.add_column("cells", justify="right")
    for rs in p.rule_sets:
        pt.add_column(rs.name)
    labels = {rs.name: p.labels(rs) for rs in p.rule_sets}
    for prod in p.products:
        labs = []
        for rs in p.rule_sets:
            lab = labels[rs.name][prod.id]
            labs.append("[green]allow[/green]" if not lab.violates else f"[red]{lab.short()}[/red]")
        assignment = ", ".join(f"{k}={v}" for k, v in prod.assignment.items())
        if prod.priority:
            assignment += f" (priority {prod.priority})"
        pt.add_row(prod.id, assignment, str(cells[prod.id]), *labs)
    if grid.n_uncovered:
        labs = []
        for rs in p.rule_sets:
            lab = p.uncovered_label(rs)
            labs.append("-" if lab is None else "[green]allow[/green]" if not lab.violates else f"[red]{lab.short()}[/red]")
        pt.add_row("[italic](uncovered)[/italic]", "e.g. " + describe_cell(grid.uncovered_example() or {}), str(grid.n_uncovered), *labs)
    console.print(pt)
    console.print(
        f"Precedence: each of the {grid.n_cells} cells of the attribute grid belongs to the most specific product "
        "that matches it, then to the one with the highest priority; uncovered cells take each rule set's default.",
        highlight=False,
    )
    rt = Table(title="Rule sets")
    for col in ("rule set", "audience", "review / block at", "rules"):
        rt.add_column(col)
    for rs in p.rule_sets:
        rules = "\n".join(f"{i + 1}. {r.title}" + (f" ({r.severity})" if r.severity else "") for i, r in enumerate(rs.rules))
        rules += f"\ndefault: {rs.default or '-'}"
        rt.add_row(rs.name, rs.audience, f"{rs.thresholds.review} / {rs.thresholds.block}", rules)
    console.print(rt)
    from rich.markup import escape

    from icm.moderation.evidence.plan import offline_summary

    et = Table(title="Offline evidence (the detector backend): what each question is judged from")
    for col in ("question", "from", "when nothing fires", "here"):
        et.add_column(col)
    for row in offline_summary(p):
        et.add_row(str(row["target"]), escape("\n".join(row["from"])) or "-", str(row["silent"] or "-"), escape(str(row["here"])))  # type: ignore[arg-type]
    console.print(et)
    if p.standard_categories:
        ct = Table(title="Standard categories (icm policy categories): products mapped, scored when the rule set labels them violate")
        ct.add_column("scheme")
        ct.add_column("category")
        ct.add_column("products", overflow="fold")
        for scheme_name, cats in p.standard_categories.items():
            for cat, ids in cats.items():
                ct.add_row(scheme_name, f"{cat} ({SCHEMES[scheme_name][cat]})", ", ".join(ids))
        console.print(ct)


def category_rows(scheme_name: str, policies: list[Policy]) -> list[dict[str, object]]:
    """Every category of the scheme with the (policy, product) pairs mapped to it (maybe none)."""
    rows: list[dict[str, object]] = []
    for cat, title in SCHEMES[scheme_name].items():
        products = [{"policy": p.name, "product": pid} for p in policies for pid in p.standard_categories.get(scheme_name, {}).get(cat, [])]
        rows.append({"category": cat, "title": title, "products": products})
    return rows


@app.command()
def categories(
    scheme_name: str = typer.Option("openai", "--scheme", help=f"The category scheme: {', '.join(SCHEMES)}"),
    policy: list[str] = typer.Option(
        [], "--policy", help="Only these policies (built-in names or YAML paths; repeatable). Default: every built-in policy"
    ),
    json_: bool = JsonOpt,
) -> None:
    """Every category of a standard scheme with the policies' products mapped to it."""
    if scheme_name not in SCHEMES:
        print_error(f"unknown scheme {scheme_name!r} (known: {', '.join(SCHEMES)})")
        raise typer.Exit(2)
    policies = [_load(n) for n in (policy or builtin_policy_names())]
    rows = category_rows(scheme_name, policies)
    if json_:
        print_json(rows)
        return
    t = Table(title=f"Scheme {scheme_name}: products mapped to each category ({len(policies)} policies)")
    t.add_column("category", no_wrap=True)
    t.add_column("title")
    t.add_column("products (policy: product, ...)", overflow="fold")
    for r in rows:
        by_policy: dict[str, list[str]] = {}
        for item in r["products"]:  # type: ignore[attr-defined]
            by_policy.setdefault(item["policy"], []).append(item["product"])
        cell = "\n".join(f"{pol}: {', '.join(ids)}" for pol, ids in by_policy.items()) or "[dim](none)[/dim]"
        t.add_row(str(r["category"]), str(r["title"]), cell)
    console.print(t)


def taxonomy_rows(policies: list[Policy]) -> list[dict[str, object]]:
    """One row per policy: term, attributes, products, categories per scheme, and what the
    offline stack can do with its term when every built-in source is installed."""
    from icm.moderation.evidence.plan import coverage

    reach = {"clear": "clears", "flag": "flags only", "none": "cannot judge"}
    rows: list[dict[str, object]] = []
    for p in policies:
        cats = p.standard_categories
        rows.append({
            "policy": p.name, "term": p.term.id, "attributes": [a.id for a in p.attributes], "products": len(p.products),
            **{name: [c for c in SCHEMES[name] if c in cats.get(name, {})] for name in SCHEMES},
            "offline": reach[coverage(p, lambda _name: None)["term"].reach],
        })
    return rows


@app.command()
def taxonomy(
    bundle: str = typer.Argument("icm-standard", help="A bundle (built-in name or YAML path)"),
    json_: bool = JsonOpt,
) -> None:
    """The bundle's policies as a Markdown table: categories per scheme and what the offline stack can do."""
    from icm.policy.bundle import load_bundle

    b = load_bundle(bundle)
    if b is None:
        print_error(f"no bundle {bundle!r}")
        raise typer.Exit(2)
    rows = taxonomy_rows([_load(n) for n in b.policies])
    if json_:
        print_json(rows)
        return
    head = ["policy", "term", "attributes", "products", *SCHEMES, "offline (term)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['policy']}`", str(r["term"]), ", ".join(r["attributes"]), str(r["products"])]  # type: ignore[arg-type]
        cells += [", ".join(r[name]) or "-" for name in SCHEMES]  # type: ignore[arg-type]
        lines.append("| " + " | ".join([*cells, str(r["offline"])]) + " |")
    typer.echo("\n".join(lines))


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Policy YAML files"),
    strict: bool = typer.Option(False, help="Treat warnings as errors."),
    json_: bool = JsonOpt,
) -> None:
    """Check policy files; every problem is reported as FILE:LINE: message."""
    failed = False
    report = []
    for f in files:
        try:
            policy, warnings = load_policy_file(f)
        except PolicyError as exc:
            failed = True
            report.append({"file": str(f), "ok": False, "issues": [str(i) for i in exc.issues]})
            if not json_:
                for i in exc.issues:
                    print_error(i)
            continue
        if strict and warnings:
            failed = True
        infos = [Issue(i.level, i.loc, i.message, str(f)) for i in check_policy(policy) if i.level == "info"]
        grid = policy.grid
        report.append({
            "file": str(f), "ok": not (strict and warnings), "issues": [str(w) for w in warnings],
            "info": [str(i) for i in infos],
            "grid": {"cells": grid.n_cells, "uncovered": grid.n_uncovered, "uncovered_example": grid.uncovered_example()},
        })
        if not json_:
            for w in warnings:
                print_warning(w)
            for i in infos:
                console.print(str(i), highlight=False)
            console.print(f"{f}: ok ({policy.name}: {len(policy.products)} products, {len(policy.rule_sets)} rule sets)", highlight=False)
    if json_:
        print_json(report)
    raise typer.Exit(1 if failed else 0)


@app.command()
def diff(
    before: str = typer.Argument(..., help="POLICY:RULESET, e.g. icm-sexy:icm-default"),
    after: str = typer.Argument(..., help="POLICY:RULESET, e.g. icm-sexy:children"),
    json_: bool = JsonOpt,
) -> None:
    """The products whose label changes from one rule set to another."""
    try:
        pa, ra = policy_ref(before)
        pb, rb = policy_ref(after)
    except (PolicyError, KeyError) as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    d = diff_rule_sets(pa, ra, pb, rb)
    if json_:
        print_json(d)
        return
    severity_only = len(d.changes) - d.verdict_changes
    t = Table(
        title=f"{d.before} -> {d.after}: {len(d.changes)} products relabelled "
        f"({d.verdict_changes} change verdict, {severity_only} only severity), {d.unchanged} unchanged"
    )
    t.add_column("product", no_wrap=True)
    t.add_column(before)
    t.add_column(after)
    t.add_column("rule that fires after")
    for c in d.changes:
        t.add_row(
            c.product,
            c.before.short() if c.before else "-",
            c.after.short() if c.after else "-",
            c.after.rule if c.after else "-",
        )
    console.print(t)
    tb, ta = d.thresholds_before, d.thresholds_after
    if tb != ta:
        console.print(f"thresholds on P(violation), review / block: {tb.review} / {tb.block} -> {ta.review} / {ta.block}")


@app.command()
def prompts(name: str = typer.Argument(..., help="Built-in policy name or YAML path"), json_: bool = JsonOpt) -> None:
    """The prompts compiled from a policy: term question, attribute questions, data-generation stages."""
    c = compile_prompts(_load(name))
    if json_:
        print_json(c)
        return
    console.rule(f"term question ({c.term.term})")
    console.print(c.term.prompt, highlight=False)
    for a in c.attributes:
        console.rule(f"attribute question: {a.attribute}")
        console.print(a.prompt, highlight=False)
    if c.stages:
        s = c.stages[0]
        console.rule(f"data-generation stages (shown for product {s.product}; one per product with --json)")
        for stage in ("explicit", "implicit", "explanation", "combined"):
            console.print(f"[bold]{stage}[/bold]\n{getattr(s, stage)}\n", highlight=False)
    console.rule("Q-A generation (text LLM)")
    console.print(c.qa_generation, highlight=False)
