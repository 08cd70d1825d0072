"""The arena: blind side-by-side human votes between models' images, turned into rankings and training data.

``diffalign arena`` serves pairs of images for the same prompt from several models' manifests
(:mod:`.sources`, :mod:`.schedule`) in a Gradio app (:mod:`.app`; the page's wording, keys and
reveal: :mod:`.page`; images scaled up and blinded: :mod:`.display`; request guards:
:mod:`.guards`), keeps every acknowledged
vote in SQLite (:mod:`.store`), and ranks the models by win rate and Bradley-Terry (:mod:`.rank`);
``diffalign export-votes`` writes the votes as a Pick-a-Pic v2-schema parquet that
``diffalign train`` reads (:mod:`.export`). Sessions are the server's (signed HttpOnly cookies, or
the logged-in user) and rate-limited (:mod:`.sessions`); sessions that look automated are left
off the leaderboard and out of the export (:mod:`.suspicion`). :mod:`.client` drives a running
arena over HTTP (load benchmark, tests), and :mod:`.cli` registers both commands.
"""
