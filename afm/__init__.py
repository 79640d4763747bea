"""The `afm` command and the Airflow glue: the top of the import graph."""
