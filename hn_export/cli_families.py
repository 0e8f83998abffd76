"""`hn-export families`: the supported model families, their presets, site roles and denoising loop.

    hn-export families            # one block per family
    hn-export families --json
"""

from __future__ import annotations

import json

import click

from models.families import FAMILIES


def _describe(family) -> dict:
    roles: dict[str, list[str]] = {}
    for rule in family.role_rules:
        block_list = rule[3] if len(rule) > 3 and rule[3] is not None else None
        linears = roles.setdefault(rule[2], [])
        linears.append(f"{block_list}.i.{rule[0]}" if block_list and len(family.block_lists) > 1 else rule[0])
    return {"name": family.name, "class": family.class_name, "pipeline": family.pipeline_class,
            "description": family.description, "block_lists": list(family.block_lists),
            "presets": {name: preset.description for name, preset in family.presets.items()},
            "roles": roles, "hadamard_widths": list(family.hadamard_widths), "guidance_scale": family.guidance_scale,
            "demo_preset": family.demo_preset}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def families_command(as_json: bool) -> None:
    """List the supported model families (a new family is one module in models/families/ plus a registry line)."""
    described = [_describe(f) for f in FAMILIES.values()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for fam in described:
        click.echo(f"{fam['name']}: {fam['description']}")
        click.echo(f"  diffusers {fam['class']} in {fam['pipeline']}; blocks: {', '.join(fam['block_lists'])}; "
                   f"guidance {fam['guidance_scale']}; site widths {fam['hadamard_widths']}; "
                   f"demo: hn-export demo --family {fam['name']}")
        for name, what in fam["presets"].items():
            click.echo(f"  preset {name:<28} {what}")
        for role, linears in fam["roles"].items():
            click.echo(f"  role {role:<24} {', '.join(linears)}")
        click.echo("")
