"""The web console at /console: server-rendered pages (Jinja2, htmx, uPlot; vendored static
files, no build step) for platform operators and organizations' admins, and the playground.
serai.console.site mounts it on an app."""
