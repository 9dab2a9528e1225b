/* A do-nothing libpcaudio.so.0 for carrying espeak-ng to a machine without apt (see training/bundle_espeak.py).
 * espeak-ng only opens an audio device to play sound; with --stdout it never does, so every call can fail. */
#include <stddef.h>

struct audio_object;

struct audio_object *create_audio_device_object(const char *device, const char *application, const char *name) {
    (void)device; (void)application; (void)name;
    return NULL;
}
int audio_object_open(struct audio_object *o, int format, unsigned rate, unsigned char channels) {
    (void)o; (void)format; (void)rate; (void)channels;
    return -1;
}
void audio_object_close(struct audio_object *o) { (void)o; }
void audio_object_destroy(struct audio_object *o) { (void)o; }
int audio_object_write(struct audio_object *o, const void *data, size_t bytes) {
    (void)o; (void)data; (void)bytes;
    return -1;
}
int audio_object_drain(struct audio_object *o) { (void)o; return -1; }
int audio_object_flush(struct audio_object *o) { (void)o; return -1; }
const char *audio_object_strerror(struct audio_object *o, int error) { (void)o; (void)error; return "no audio output"; }
