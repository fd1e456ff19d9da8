"""Recipes: a YAML chain of steps (trim, dilute, prune, afcc, finetune, export, bench, ...) that
compresses a model, checked when loaded and carried out into one run folder."""

from compress.recipe.schema import Recipe, RecipeModel, apply_overrides, load_recipe, parse_recipe
from compress.recipe.step import CheckContext, Step, get_step, list_steps, register_step

__all__ = ["Recipe", "RecipeModel", "apply_overrides", "load_recipe", "parse_recipe", "CheckContext", "Step",
           "get_step", "list_steps", "register_step"]
