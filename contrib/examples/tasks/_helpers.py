"""Files starting with _ are helpers, not tasks: task files can `import _helpers`."""


def shout(text: str) -> str:
    return text.upper() + "!"
