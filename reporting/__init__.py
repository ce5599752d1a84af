"""Reading a run's outputs back for people: the DuckDB SQL (`sql`, written
once), the text summary (`summary`) and the HTML report (`report`), both
over a run directory checked and made local by `run_files`.

Not Beam code: it reads Parquet files a finished run wrote.
"""
