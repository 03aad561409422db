"""An example spie plugin: the `reinforce` objective and the `greenness` scorer."""
