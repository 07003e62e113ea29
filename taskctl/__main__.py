from taskctl.cli import command

command()
