"""The web dashboard (``funboost_like web``): pages and a JSON API over the operations service layer.

Standard library only. See ``docs/dashboard.md``; start one from Python with
:func:`funboost_like.web.server.make_server`.
"""
