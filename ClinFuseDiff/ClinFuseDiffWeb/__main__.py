from ClinFuseDiffWeb.app import main

main()
