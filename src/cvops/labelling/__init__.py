"""Close the loop: pick predictions worth labelling, label them in Label Studio, turn the labels
into feedback rows and the next DVC dataset version, retrain (`cvops label push / pull`)."""
