"""A test reward that varies with the completion (TRL's signature): non-zero group-normalised advantages even for
a random student, so RL tests have an update to compare."""


def length_mod_three(prompts, completions, **kwargs):
    return [(len(str(c)) % 3) / 2 for c in completions]
