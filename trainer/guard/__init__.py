"""Guards against reward hacking: image statistics of the probe's edits against the starting policy's."""
