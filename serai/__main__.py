from serai.cli import app

app()
