"""Reading a run's outputs back for people: the DuckDB SQL (`sql`, written
once), the text summary (`summary`) and the HTML report (`report`).

Not Beam code: it reads Parquet files a finished run wrote.
"""
